"""Property tests of the user-data readers and the image decoder, with hypothesis.

Each example writes a table (or folder) whose every row the test knows to be good or bad, and
why, and checks: with ``bad_rows="error"`` a ValueError naming the file, the first bad row and
its reason, or, without bad rows, the exact captions, alternatives, labels and pixels; with
``bad_rows="skip"`` exactly the good rows, in order, and exactly the bad ones in ``skipped``.
Random byte soups are checked against a small oracle written from the documented rules.
Deterministic (``derandomize=True``); the case count is printed at the end of the session.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import re
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.data import CsvPairDataset, FolderPairDataset, ImageCache
from tests.data.fuzz_helpers import (
    GOOD_IMAGES,
    GOOD_NAMES,
    SIDE,
    TAIL,
    TRUNCATABLE,
    composite,
    grey16_to_8,
    png_bytes,
)
from tests.fuzz_cases import count

# A RAM-backed folder where there is one: creating and removing a folder per example on a disk
# costs milliseconds (the suite makes over 10,000), on tmpfs a tenth of one.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextmanager
def scratch(seconds: int = 20):
    """A temporary folder for one example, which fails (rather than hangs) after ``seconds``."""

    def hang(*_):
        raise AssertionError(f"no result after {seconds} s: the reader hangs")

    alarm = hasattr(signal, "SIGALRM")
    previous = signal.signal(signal.SIGALRM, hang) if alarm else None
    if alarm:
        signal.alarm(seconds)
    try:
        with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
            yield tmp
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


MARK = "\x01"  # stands for an undecodable byte sequence until the text is encoded
BAD_SEQUENCES = [b"\xff", b"\xe9", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
UTF8_ALPHABET = "ab Z9,;:\"'\t\n\\é☕𝄞\u2028\x85ß{}[]"
LATIN1_ALPHABET = "ab Z9,;\"'\t\néÃ©ßü"
LABELS = ["cat", "dog", " emu ", "", "dog"]


@dataclass
class Spec:
    """What the test knows about one row: the text written and the expected outcome."""

    kind: str
    caption: str = ""
    image: str = ""  # the GOOD_IMAGES entry written for the row (unless its kind is an image problem)
    label: str | None = None
    cut: int = 0
    ext: str = "png"
    garbage: bytes = b""
    pad: tuple[str, str] = ("", "")
    alternatives: list[str] = field(default_factory=list)


def first_bad_byte(data: bytes) -> tuple[int, int, int] | None:
    """(byte, line offset, column) of the first byte of ``data`` that is not UTF-8, found with Python's decoder."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start]
        line = prefix.count(b"\n")
        column = len(prefix.rsplit(b"\n", 1)[-1].decode("utf-8")) + 1
        return data[exc.start], line, column


def where_in_row(offset: int, column: int, first_line: int) -> str:
    """How a reason places a character ``offset`` lines into a row that starts at ``first_line``."""
    return f"column {column}" if offset == 0 else f"line {first_line + offset}, column {column}"


def nul_position(text: str) -> tuple[int, int] | None:
    if "\x00" not in text:
        return None
    prefix = text[: text.index("\x00")]
    return prefix.count("\n"), len(prefix.rsplit("\n", 1)[-1]) + 1


def place_images(folder: Path, specs: list[Spec], parent: Path) -> list[str]:
    """Write each row's image file (or its bad stand-in); returns the path text of each row."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for k, spec in enumerate(specs):
        if spec.kind not in IMAGE_KINDS:  # the row's problem, if any, is not its image
            ext, data, _ = GOOD_IMAGES[spec.image]
            name = f"img/{k}.{ext}"
            (folder / name).write_bytes(data)
        elif spec.kind == "absolute":
            ext, data, _ = GOOD_IMAGES[spec.image]
            name = str(parent / f"abs{k}.{ext}")
            Path(name).write_bytes(data)
        elif spec.kind == "outside":
            name = "../outside.png"
            (parent / "outside.png").write_bytes(GOOD_IMAGES["rgb-png"][1])
        elif spec.kind == "missing_image":
            name = f"img/none{k}.png"
        elif spec.kind == "truncated":
            name = f"img/{k}.{spec.ext}"
            (folder / name).write_bytes(TRUNCATABLE[spec.ext][: spec.cut])
        elif spec.kind == "garbage":
            name = f"img/{k}.{spec.ext}"
            (folder / name).write_bytes(b"\x00" + spec.garbage)  # no image format starts with NUL
        elif spec.kind == "directory":
            name = f"img/dir{k}.png"
            (folder / name).mkdir()
        elif spec.kind == "loop":
            name = f"img/loop{k}.png"
            os.symlink(f"loop{k}.png", folder / name)
        else:
            raise AssertionError(spec.kind)
        paths.append(spec.pad[0] + name + spec.pad[1])
    return paths


def image_reason(spec: Spec, folder: Path, path: str) -> str | None:
    """The expected reason of an image problem (a prefix for decode errors), or None."""
    full = folder / path.strip()
    if spec.kind == "missing_image":
        return f"image file not found: {full}"
    if spec.kind == "outside":
        return f"image path ../outside.png is outside the data folder {os.path.realpath(folder)}"
    if spec.kind in ("truncated", "garbage"):
        return f"cannot decode image {full}: "
    if spec.kind == "directory":
        return f"image path is not a file: {full}"
    if spec.kind == "loop":
        return f"image path is a symlink loop: {full}"
    return None


def check_loaded(ds, expected: list[tuple[int, str, Spec]], label_column: str | None):
    """``ds`` holds exactly the expected good rows: numbers, captions, pixels, labels."""
    assert ds.rows == [n for n, _, _ in expected]
    assert ds.texts == [caption for _, caption, _ in expected]
    assert ds.alternatives == [spec.alternatives for _, _, spec in expected]
    pixels = np.stack([GOOD_IMAGES[spec.image][2] for _, _, spec in expected])
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), pixels)
    if label_column:
        names = sorted({spec.label.strip() for _, _, spec in expected})
        assert ds.class_names == {label_column: names}
        assert ds.labels[label_column].tolist() == [names.index(spec.label.strip()) for _, _, spec in expected]


def check_both_policies(path: Path, build, expected_good, expected_bad):
    """``expected_bad``: [(row, where, reason prefix)] in file order; ``build(bad_rows)``."""
    if expected_bad:
        try:
            build("error")
        except ValueError as exc:
            row, where, reason = expected_bad[0]
            message = str(exc)
            assert message.startswith(f"{path}: {where}: {reason}"), (message, expected_bad[0])
            more = len(expected_bad) - 1
            assert (f"({more} more bad rows)" in message) == (more > 0), message
        else:
            raise AssertionError(f"no error for bad rows {expected_bad}")
    if not expected_good:
        try:
            build("skip")
        except ValueError as exc:
            assert str(exc).startswith(f"{path}: no usable rows ("), str(exc)
            return None
        raise AssertionError("loaded a table without good rows")
    ds = build("skip")
    assert [s["row"] for s in ds.skipped] == [row for row, _, _ in expected_bad]
    for skipped, (_, _, reason) in zip(ds.skipped, expected_bad):
        assert skipped["reason"].startswith(reason) and skipped["source"] == str(path), (skipped, reason)
    if not expected_bad:
        assert build("error").rows == ds.rows
    return ds


# --- CSV / TSV ------------------------------------------------------------------------------------

IMAGE_KINDS = ["missing_image", "outside", "absolute", "truncated", "garbage", "directory", "loop"]
CSV_KINDS = ["good"] * 6 + ["empty_caption", "short", "extra", "nul", "bad_byte", "huge", "empty_label"] + IMAGE_KINDS


def text(rnd: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rnd.choice(alphabet) for _ in range(rnd.randint(low, high)))


def row_spec(kind: str, seed: int, alphabet: str, allow_marks: bool = True) -> Spec:
    """One row of ``kind``; its details (image, caption, padding, cut, garbage) come from ``seed``.

    Hypothesis draws the structure (encoding, kinds, options) and shrinks it; the details are
    drawn with a seeded ``random.Random``, as drawing every character costs more than a case.
    """
    rnd = random.Random(seed)
    image = rnd.choice(GOOD_NAMES)
    if kind == "bad_byte" and not allow_marks:
        kind = "good"
    caption = text(rnd, alphabet, 0, 12)
    if kind in ("good", "absolute") and not caption.strip():
        caption = caption + "x"
    if kind == "empty_caption":
        caption = rnd.choice(["", " ", " \t ", "\n", " \xa0 " if alphabet == LATIN1_ALPHABET else " \u2028 "])
    elif kind == "huge":
        caption = "h" * 100_000 + caption
    elif kind == "nul":
        caption = caption + "\x00" + text(rnd, "ab", 0, 3)
    elif kind == "bad_byte":
        caption = caption + MARK + text(rnd, "ab ", 0, 3)
    spec = Spec(kind=kind, caption=caption, image=image)
    spec.pad = (rnd.choice(["", " "]), rnd.choice(["", "  "]))
    if kind == "truncated":
        spec.ext = rnd.choice(sorted(TRUNCATABLE))
        spec.cut = rnd.randint(0, len(TRUNCATABLE[spec.ext]) - TAIL)
    elif kind == "garbage":
        spec.ext = rnd.choice(["png", "jpg", "jpeg", "webp", "bmp"])
        spec.garbage = rnd.randbytes(rnd.randint(0, 40))
    return spec


SEED = st.integers(0, 2**32 - 1)


@st.composite
def csv_case(draw):
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    alphabet = LATIN1_ALPHABET if encoding == "latin-1" else UTF8_ALPHABET
    rows = draw(st.lists(st.tuples(st.sampled_from(CSV_KINDS), SEED), max_size=6))
    specs = [row_spec(kind, seed, alphabet, encoding != "latin-1") for kind, seed in rows]
    with_label = draw(st.booleans())
    rnd = random.Random(draw(SEED))
    for spec in specs:
        spec.label = rnd.choice(LABELS) if with_label else None
        if spec.kind == "empty_label":
            spec.label = "" if with_label else None
            spec.kind = "empty_label" if with_label else "good"
        elif with_label and spec.label == "":
            spec.label = "cat"
    header = ["image", "text"] + (["kind"] if with_label else [])
    if rnd.random() < 0.5:
        header.insert(rnd.randint(0, len(header)), "notes")
    rnd.shuffle(header)
    options = {
        "tsv": draw(st.booleans()),
        "crlf": rnd.random() < 0.5,
        "quote_all": rnd.random() < 0.5,
        "blank_lines": [rnd.random() < 0.2 for _ in range(len(specs) + 1)],
        "bad": [rnd.choice(BAD_SEQUENCES) for _ in specs],
    }
    return encoding, specs, header, with_label, options


def encode_row(text: str, encoding: str, bad: bytes) -> bytes:
    if encoding == "utf-16":
        return text.encode("utf-16-le").replace(MARK.encode("utf-16-le"), b"\x00\xdc")  # a lone low surrogate
    return text.encode("utf-8" if encoding == "utf-8-sig" else encoding).replace(MARK.encode(), bad)


@fuzz(3200)
@given(csv_case())
def test_csv_and_tsv_tables(case):
    count("readers")
    encoding, specs, header, with_label, options = case
    delimiter = "\t" if options["tsv"] else ","
    terminator = "\r\n" if options["crlf"] else "\n"
    with scratch() as tmp:
        parent = Path(tmp)
        folder = parent / "data"
        folder.mkdir()
        paths = place_images(folder, specs, parent)
        path = folder / ("pairs.tsv" if options["tsv"] else "pairs.csv")

        def line(fields):
            buffer = io.StringIO()
            quoting = csv.QUOTE_ALL if options["quote_all"] else csv.QUOTE_MINIMAL
            csv.writer(buffer, delimiter=delimiter, lineterminator=terminator, quoting=quoting).writerow(fields)
            return buffer.getvalue()

        blob = {"utf-8-sig": codecs.BOM_UTF8, "utf-16": codecs.BOM_UTF16_LE}.get(encoding, b"")
        blob += encode_row(line(header), encoding, b"")
        line_no = 2
        good, bad = [], []
        for n, (spec, image) in enumerate(zip(specs, paths), start=1):
            if options["blank_lines"][n - 1]:
                blob += encode_row(terminator, encoding, b"")
                line_no += 1
            values = {"image": image, "text": spec.caption, "kind": spec.label, "notes": "n"}
            fields = [values[c] for c in header]
            if spec.kind == "short":
                fields = fields[:1]
            elif spec.kind == "extra":
                fields = fields + ["surplus"]
            text = line(fields)
            data = encode_row(text, encoding, options["bad"][n - 1])
            blob += data
            where, first_line = f"row {n} (line {line_no})", line_no
            line_no += text.count("\n")
            # the expected outcome, in the order the reader checks
            byte = first_bad_byte(data) if encoding != "utf-16" else None
            nul = nul_position(text)
            if encoding == "utf-16" and MARK in text:
                bad.append((n, where, "not valid UTF-16 (byte 0x"))
            elif byte:
                bad.append((n, where, f"not valid UTF-8 (byte 0x{byte[0]:02x} at {where_in_row(byte[1], byte[2], first_line)})"))
            elif nul:
                bad.append((n, where, f"contains a NUL character at {where_in_row(*nul, first_line)}"))
            elif spec.kind == "extra":
                bad.append((n, where, f"{len(header) + 1} fields but the header has {len(header)}"))
            elif spec.kind == "short":
                missing = [c for c in ["image", "text"] + (["kind"] if with_label else []) if c != header[0]]
                bad.append((n, where, f"missing column {', '.join(map(repr, missing))}"))
            elif spec.kind == "outside":
                bad.append((n, where, image_reason(spec, folder, image)))
            elif not spec.caption.strip():
                bad.append((n, where, "empty caption in column 'text'"))
            elif with_label and not spec.label.strip():
                bad.append((n, where, "empty label in column 'kind'"))
            elif image_reason(spec, folder, image):
                bad.append((n, where, image_reason(spec, folder, image)))
            else:
                caption = spec.caption
                if encoding == "latin-1":  # latin-1 bytes that happen to be valid UTF-8 read as UTF-8
                    caption = caption.encode("latin-1").decode("utf-8")
                good.append((n, caption.strip(), spec))
        path.write_bytes(blob)

        def build(bad_rows):
            return CsvPairDataset(path, image_size=SIDE, bad_rows=bad_rows, cache_dir=False,
                                  label_columns=("kind",) if with_label else ())

        if not specs:
            try:
                build("skip")
            except ValueError as exc:
                assert str(exc) == f"{path}: no data rows"
                return
            raise AssertionError("loaded a table without rows")
        ds = check_both_policies(path, build, good, bad)
        if ds is not None:
            check_loaded(ds, good, "kind" if with_label else None)


# --- JSON Lines and JSON arrays ---------------------------------------------------------------

JSON_KINDS = ["good"] * 6 + ["list_caption", "empty_caption", "missing_key", "null", "number_caption",
                             "bad_list", "number_image", "empty_image", "not_json", "not_object", "raw_nul",
                             "escaped_nul", "surrogate", "bad_byte", "huge", "empty_label"] + IMAGE_KINDS


@st.composite
def json_case(draw):
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]))
    array = draw(st.booleans())
    kinds = [k for k in JSON_KINDS if not (array and k == "not_json")]
    rows = draw(st.lists(st.tuples(st.sampled_from(kinds), SEED), max_size=6))
    rnd = random.Random(draw(SEED))
    specs = []
    for kind, seed in rows:
        spec = row_spec(kind, seed, UTF8_ALPHABET, allow_marks=encoding != "utf-16")
        if spec.kind == "list_caption":
            spec.alternatives = rnd.choices(["alt", " alt ", "other", "", "  "], k=rnd.randint(0, 4))
        specs.append(spec)
    with_label = draw(st.booleans())
    for spec in specs:
        spec.label = rnd.choice(LABELS[:3] + ["7"]) if with_label else None
        if spec.kind == "empty_label":
            spec.label = " " if with_label else None
            spec.kind = "empty_label" if with_label else "good"
    options = {
        "ascii": rnd.random() < 0.5,
        "crlf": rnd.random() < 0.5,
        "separators": [rnd.choice([",\n", ", ", ",\n\n", " ,\t"]) for _ in specs],
        "blank_lines": [rnd.choice(["", "", "\n", "  \n", "\t\r\n"]) for _ in specs],
        "bad": [rnd.choice(BAD_SEQUENCES) for _ in specs],
    }
    return encoding, array, specs, with_label, options


def json_item(spec: Spec, image: str, with_label: bool, ascii_only: bool) -> tuple[str, str | None]:
    """(JSON text of the item, expected reason fragment if the item itself is bad)."""
    record: dict = {"image": image, "text": spec.caption}
    reason = None
    if with_label:
        record["kind"] = int(spec.label) if spec.label == "7" else spec.label
    if spec.kind == "list_caption":
        record["text"] = [spec.caption, *spec.alternatives]
    elif spec.kind == "missing_key":
        del record["text"]
        reason = "missing column 'text'"
    elif spec.kind == "null":
        record["image"] = None
        reason = "missing column 'image'"
    elif spec.kind == "number_caption":
        record["text"] = 3.5
        reason = "column 'text' must be a string, got float"
    elif spec.kind == "bad_list":
        record["text"] = [spec.caption or "x", 5]
        reason = "column 'text' must be a string or a list of strings"
    elif spec.kind == "number_image":
        record["image"] = 12
        reason = "column 'image' must be a path string, got int"
    elif spec.kind == "empty_image":
        record["image"] = "  "
        reason = "empty image path in column 'image'"
    elif spec.kind in ("escaped_nul", "raw_nul"):
        record["text"] = spec.caption + "\x00"  # json.dumps writes \u0000
        reason = "column 'text' contains a NUL character"
    elif spec.kind == "surrogate":
        record["text"] = spec.caption + "\ud83d"  # an unpaired surrogate, escaped as \ud83d
        reason = "column 'text' contains an unpaired surrogate \\ud83d (not valid Unicode)"
    if spec.kind == "not_object":
        return json.dumps([image, spec.caption]), "expected an object with keys 'image', 'text'"
    if spec.kind == "not_json":
        return '{"image": "' + image + '", "text": ', "not valid JSON ("
    text = json.dumps(record, ensure_ascii=ascii_only or spec.kind == "surrogate")
    if spec.kind == "raw_nul":
        text = text.replace("\\u0000", "\x00")
    text = text.replace("\\u0001", MARK)  # bad_byte: a raw mark, replaced by bad bytes when encoded
    return text, reason


@fuzz(2600)
@given(json_case())
def test_jsonl_and_json_arrays(case):
    count("readers")
    encoding, array, specs, with_label, options = case
    with scratch() as tmp:
        parent = Path(tmp)
        folder = parent / "data"
        folder.mkdir()
        paths = place_images(folder, specs, parent)
        path = folder / ("pairs.json" if array else "pairs.jsonl")
        newline = "\r\n" if options["crlf"] else "\n"
        chunks: list[tuple[str, bytes]] = []  # (text, bytes) pieces of the file, in order
        good, bad, fatal = [], [], []
        line_no = 1
        if array:
            chunks.append(("[" + newline, b""))
            line_no = 2

        for n, (spec, image) in enumerate(zip(specs, paths), start=1):
            if not array and options["blank_lines"][n - 1]:
                chunks.append((options["blank_lines"][n - 1], b""))
                line_no += options["blank_lines"][n - 1].count("\n")
            text, reason = json_item(spec, image, with_label, options["ascii"])
            data = encode_row(text, encoding, options["bad"][n - 1])
            where = f"item {n} (line {line_no})" if array else f"line {line_no}"
            if array and spec.kind == "raw_nul":
                fatal.append(where)
            byte = first_bad_byte(data) if encoding != "utf-16" else None
            if encoding == "utf-16" and MARK in text:
                bad.append((n if array else line_no, where, "not valid UTF-16 (byte 0x"))
            elif byte:
                bad.append((n if array else line_no, where, f"not valid UTF-8 (byte 0x{byte[0]:02x} at column "))
            elif "\x00" in text:
                bad.append((n if array else line_no, where, "contains a NUL character at column "))
            elif reason:
                bad.append((n if array else line_no, where, reason))
            else:
                caption_texts = [spec.caption, *spec.alternatives] if spec.kind == "list_caption" else [spec.caption]
                stripped = [t.strip() for t in caption_texts if t.strip()]
                if spec.kind == "outside":
                    bad.append((n if array else line_no, where, image_reason(spec, folder, image)))
                elif not stripped:
                    bad.append((n if array else line_no, where, "empty caption in column 'text'"))
                elif with_label and not spec.label.strip():
                    bad.append((n if array else line_no, where, "empty label in column 'kind'"))
                elif image_reason(spec, folder, image):
                    bad.append((n if array else line_no, where, image_reason(spec, folder, image)))
                else:
                    spec.alternatives = list(dict.fromkeys(t for t in stripped[1:] if t != stripped[0]))
                    good.append((n if array else line_no, stripped[0], spec))
            chunks.append((text, data))
            separator = options["separators"][n - 1] if array and n < len(specs) else newline
            chunks.append((separator, b""))
            line_no += separator.count("\n")
        if array:
            chunks.append(("]" + newline, b""))
        blob = {"utf-8-sig": codecs.BOM_UTF8, "utf-16": codecs.BOM_UTF16_LE}.get(encoding, b"")
        for text, data in chunks:
            blob += data or encode_row(text, encoding, b"")
        path.write_bytes(blob)

        def build(bad_rows):
            return CsvPairDataset(path, image_size=SIDE, bad_rows=bad_rows, cache_dir=False,
                                  label_columns=("kind",) if with_label else ())

        if not specs or fatal:
            # a raw NUL is not valid JSON, and an array cannot be read past it: an error of the file
            expected = f"{path}: {fatal[0]}: contains a NUL character at column " if fatal else f"{path}: no data rows"
            for policy in ("error", "skip"):
                try:
                    build(policy)
                except ValueError as exc:
                    assert str(exc).startswith(expected), (str(exc), expected)
                else:
                    raise AssertionError(f"no error, expected {expected}")
            return
        ds = check_both_policies(path, build, good, bad)
        if ds is not None:
            check_loaded(ds, good, "kind" if with_label else None)


# --- byte soups against an oracle ------------------------------------------------------------

FRAGMENTS = [b"image", b"text", b"a.png", b"b.png", b"../a.png", b",", b"\t", b'"', b'""', b"\n", b"\r", b"\r\n",
             b" ", b"cap", b"\x00", b"\xe9", b"\xff", b"\xc3\xa9", b"{", b"}", b":", b"[", b"]", b'"image"',
             b'"text"', b'"a.png"', b"\\u0000", b"\\ud800", b"null", b"1", "\u2028".encode(), b"\xef\xbb\xbf"]
HEADERS = [b"", b"image,text\n", b"image\ttext\n", b"text,image,x\n", b'"image","text"\r\n']
ROWS = [b"a.png,cap\n", b"a.png\tcap\n", b"cap,a.png,x\n", b' a.png ,"q, \n""x"""\r\n', b"b.png,cap\n", b"\n",
        b'{"image": "a.png", "text": "cap"}\n', b'{"text": [" ", "x", "y"], "image": "a.png"}\r\n',
        b'{"image": "a.png", "text": "caf\xc3\xa9 \xe2\x80\xa8"}\n', b'[{"image": "a.png", "text": "c"}]']


def oracle_csv(text: str, delimiter: str):
    """(rows [(number, where, caption or None)]) from the documented rules, or "file" for a file error."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, rows = None, []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error:
            return "file"
        if not fields:
            continue
        raw = "".join(fields)
        if header is None:
            if re.search("[\x00\udc80-\udcff]", raw) or "image" not in fields or "text" not in fields:
                return "file"
            if fields.count("image") > 1 or fields.count("text") > 1:
                return "file"
            header = fields
            continue
        n = len(rows) + 1
        record = dict(zip(header, fields))
        caption = record.get("text", "")
        ok = (not re.search("[\x00\udc80-\udcff]", raw) and len(fields) <= len(header)
              and record.get("image", "").strip() == "a.png" and caption.strip())
        rows.append((n, f"row {n} (line {start})", caption.strip() if ok else None))
    return "file" if header is None else rows


def oracle_jsonl(text: str):
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r\n"):
            continue
        caption = None
        try:
            record = None if re.search("[\x00\udc80-\udcff]", line) else json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"].strip() == "a.png":
            value = record.get("text")
            texts = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
            if all(isinstance(t, str) for t in texts):
                texts = [t.strip() for t in texts if t.strip()]
                if texts and not any(re.search("[\x00\ud800-\udfff]", t) for t in texts):
                    caption = texts[0]
        rows.append((n, f"line {n}", caption))
    return rows


@fuzz(2700)
@given(st.sampled_from(HEADERS),
       st.lists(st.one_of(st.sampled_from(ROWS), st.sampled_from(FRAGMENTS), st.binary(max_size=4)), max_size=24),
       st.sampled_from(["csv", "tsv", "jsonl", "json"]))
def test_byte_soups(header, pieces, ext):
    count("readers")
    with scratch() as tmp:
        folder = Path(tmp)
        (folder / "a.png").write_bytes(GOOD_IMAGES["rgb-png"][1])
        data = (header if ext in ("csv", "tsv") else b"") + b"".join(pieces)
        path = folder / f"pairs.{ext}"
        path.write_bytes(data)
        body = data[3:] if data.startswith(codecs.BOM_UTF8) else data
        text = body.decode("utf-8", "surrogateescape")
        if ext in ("csv", "tsv"):
            expected = oracle_csv(text, "\t" if ext == "tsv" else ",")
        elif ext == "json" and text.lstrip(" \t\r\n").startswith("["):
            expected = None  # a JSON array: only the error contract is checked
        else:
            expected = oracle_jsonl(text)
        outcomes = {}
        for policy in ("error", "skip"):
            try:
                outcomes[policy] = CsvPairDataset(path, image_size=SIDE, bad_rows=policy, cache_dir=False)
            except ValueError as exc:
                message = str(exc)
                assert message.startswith(f"{path}: "), message
                rest = message[len(str(path)) + 2 :]
                assert re.match(r"(row \d+ \(line \d+\)|line \d+|item \d+ \(line \d+\)|header \(line \d+\)): ", rest) or re.match(
                    r"(no data rows|no usable rows|empty file|header has no column|header names|line \d+: not valid JSON)", rest
                ), message
                outcomes[policy] = message
        if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)) or expected is None:
            return  # another encoding than the oracle's: the error contract above is all
        if expected == "file":
            assert isinstance(outcomes["skip"], str) and isinstance(outcomes["error"], str)
            return
        good = [(n, caption) for n, _, caption in expected if caption is not None]
        bad = [(n, where) for n, where, caption in expected if caption is None]
        if not expected:
            assert outcomes["skip"] == f"{path}: no data rows"
        elif not good:
            assert outcomes["skip"].startswith(f"{path}: no usable rows")
        else:
            ds = outcomes["skip"]
            assert not isinstance(ds, str), (ds, expected)
            assert list(zip(ds.rows, ds.texts)) == good and [s["row"] for s in ds.skipped] == [n for n, _ in bad]
            assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), GOOD_IMAGES["rgb-png"][2])
        if bad:
            assert isinstance(outcomes["error"], str), (bad, expected)
            assert outcomes["error"].startswith(f"{path}: {bad[0][1]}: "), (outcomes["error"], bad[0])
        elif good:
            assert not isinstance(outcomes["error"], str) and outcomes["error"].texts == outcomes["skip"].texts


# --- folders -------------------------------------------------------------------------------------

CAPTION_KINDS = ["good"] * 5 + ["multi", "missing", "empty", "bad_byte", "utf16", "crlf", "fifo", "outside_caption"]
FOLDER_IMAGE_KINDS = ["good"] * 5 + ["truncated", "garbage", "loop", "dangling", "outside", "fifo"]


@st.composite
def folder_case(draw):
    entries = []
    for k in range(draw(st.integers(1, 6))):
        entries.append({
            "sub": draw(st.sampled_from(["", "", "deep/"])),
            "image": draw(st.sampled_from(FOLDER_IMAGE_KINDS)),
            "name": draw(st.sampled_from(GOOD_NAMES)),
            "caption": draw(st.sampled_from(CAPTION_KINDS)),
            "text": draw(st.text(alphabet="ab é☕", min_size=1, max_size=8)).strip() or "x",
            "alternatives": draw(st.lists(st.sampled_from(["alt", "other", "alt"]), max_size=2)),
            "cut": draw(st.integers(0, len(TRUNCATABLE["png"]) - TAIL)),
        })
    return entries, draw(st.booleans()), draw(st.booleans())


@fuzz(900)
@given(folder_case())
def test_folders(case):
    count("readers")
    entries, recursive, parent_link = case
    with scratch() as tmp:
        root = Path(tmp)
        folder = root / "pairs"
        (folder / "deep").mkdir(parents=True)
        if parent_link:
            os.symlink("..", folder / "deep" / "up")  # a loop for a walker that follows symlinks
        (root / "secret.png").write_bytes(GOOD_IMAGES["rgb-png"][1])
        (root / "secret.txt").write_text("secret")
        expected = {}
        for k, entry in enumerate(entries):
            ext = GOOD_IMAGES[entry["name"]][0] if entry["image"] == "good" else "png"
            name = f"{entry['sub']}{k}.{ext}"
            image, caption_file = folder / name, (folder / name).with_suffix(".txt")
            kind = entry["image"]
            if kind == "good":
                image.write_bytes(GOOD_IMAGES[entry["name"]][1])
            elif kind == "truncated":
                image.write_bytes(TRUNCATABLE["png"][: entry["cut"]])
            elif kind == "garbage":
                image.write_bytes(b"\x00not an image")
            elif kind == "loop":
                os.symlink(image.name, image)
            elif kind == "dangling":
                os.symlink("nowhere.png", image)
            elif kind == "outside":
                os.symlink(root / "secret.png", image)
            elif kind == "fifo":
                os.mkfifo(image)
            text = entry["text"]
            lines = [text, *entry["alternatives"]]
            captions = {
                "good": text.encode(), "multi": ("\n  \n".join(lines) + "\n").encode(), "empty": b" \n\t\n",
                "bad_byte": text.encode() + b"\xe9", "utf16": codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
                "crlf": ("\r\n".join(lines)).encode("utf-8-sig"),
            }
            ckind = entry["caption"]
            if ckind in captions:
                caption_file.write_bytes(captions[ckind])
            elif ckind == "fifo":
                os.mkfifo(caption_file)
            elif ckind == "outside_caption":
                os.symlink(root / "secret.txt", caption_file)
            if entry["sub"] and not recursive:
                continue
            base = os.path.realpath(folder)
            reason = {
                "loop": f"image path is a symlink loop: {image}",
                "dangling": f"image file not found: {image} (a dangling symlink?)",
                "fifo": f"image path is not a file: {image}",
                "outside": f"image {name} links outside the data folder {base}",
            }.get(kind)
            if reason is None:
                reason = {
                    "missing": f"caption file {caption_file.name} not found",
                    "empty": f"empty caption in {caption_file.name}",
                    "bad_byte": f"caption file {caption_file.name}: not valid UTF-8 "
                                f"(byte 0xe9 at line 1, column {len(text) + 1})",
                    "fifo": f"caption file {caption_file.name} is not a regular file",
                    "outside_caption": f"caption file {caption_file.name} links outside the data folder {base}",
                }.get(ckind)
            if reason is None and kind in ("truncated", "garbage"):
                reason = f"cannot decode image {image}: "
            alternatives = list(dict.fromkeys(a for a in entry["alternatives"]
                                              if a != text)) if ckind in ("multi", "crlf") else []
            expected[name] = (reason, text, alternatives, entry["name"])
        order = sorted(expected, key=lambda n: Path(n))
        good = [(n, expected[n][1], Spec("good", image=expected[n][3], alternatives=expected[n][2]))
                for n in order if expected[n][0] is None]
        bad = [(n, f"image {n}", expected[n][0]) for n in order if expected[n][0] is not None]

        def build(bad_rows):
            return FolderPairDataset(folder, image_size=SIDE, bad_rows=bad_rows, cache_dir=False, recursive=recursive)

        if not expected:
            try:
                build("skip")
            except ValueError as exc:
                assert str(exc).startswith(f"{folder}: no images")
                return
            raise AssertionError("loaded a folder without images")
        ds = check_both_policies(folder, build, good, bad)
        if ds is not None:
            check_loaded(ds, good, None)


# --- images: every mode, truncated anywhere ---------------------------------------------------


@st.composite
def image_case(draw):
    side = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["grey16", "rgb16", "rgba16", "grey8", "rgb8", "rgba8", "la8", "key16", "palette",
                                 "palette_alpha"]))
    seed = draw(st.integers(0, 2**32 - 1))
    cut = draw(st.one_of(st.none(), st.integers(0, 400)))
    return side, kind, seed, cut


@fuzz(1200)
@given(image_case())
def test_image_modes_and_truncation(case):
    count("images")
    side, kind, seed, cut = case
    rng = np.random.default_rng(seed)
    if kind in ("palette", "palette_alpha"):
        from PIL import Image

        palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
        index = rng.integers(0, 16, (side, side), dtype=np.uint8)
        image = Image.fromarray(index, "P")
        image.putpalette(palette.tobytes())
        buffer = io.BytesIO()
        if kind == "palette_alpha":
            alpha = rng.integers(0, 256, 16, dtype=np.uint8)
            image.save(buffer, "PNG", transparency=alpha.tobytes())
            expected = composite(palette[index], alpha[index])
        else:
            image.save(buffer, "PNG")
            expected = palette[index]
        data = buffer.getvalue()
    else:
        bits = 16 if kind.endswith("16") else 8
        channels = {"grey": 1, "rgb": 3, "rgba": 4, "la": 2, "key": 1}[kind[:-2] if kind[-2:] in ("16",) else kind[:-1]]
        high = 65536 if bits == 16 else 256
        pixels = rng.integers(0, high, (side, side, channels) if channels > 1 else (side, side))
        key = None
        if kind == "key16":
            key = (int(pixels.flat[0]),)
        data = png_bytes(pixels, bits, transparency=key)
        if kind in ("grey16", "key16"):
            expected = grey16_to_8(pixels)
            if key:
                expected[pixels == key[0]] = 255
        elif bits == 16:
            eight = (pixels >> 8).astype(np.uint8)
            expected = eight if channels == 3 else composite(eight[..., :3], eight[..., 3])
        elif channels == 1:
            expected = np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=2)
        elif channels == 2:
            expected = composite(np.repeat(pixels[..., :1].astype(np.uint8), 3, axis=2), pixels[..., 1].astype(np.uint8))
        else:
            pixels = pixels.astype(np.uint8)
            expected = pixels if channels == 3 else composite(pixels[..., :3], pixels[..., 3])
    truncated = cut is not None and cut < len(data)
    with scratch() as tmp:
        path = Path(tmp) / "x.png"
        path.write_bytes(data[:cut] if truncated else data)
        images, errors = ImageCache(False).load([path], side)
    if truncated and cut <= len(data) - TAIL:
        assert errors[0].startswith(f"cannot decode image {path}: "), errors[0]
        assert not images.any()
    elif truncated and errors[0]:
        assert errors[0].startswith(f"cannot decode image {path}: "), errors[0]
    else:  # intact, or cut only in the trailer: exactly the expected pixels
        assert errors == [""], errors
        np.testing.assert_array_equal(images[0], expected)
