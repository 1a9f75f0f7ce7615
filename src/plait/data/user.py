"""Your own image-caption pairs: a CSV/TSV/JSONL table of image paths and captions, or a folder.

- :class:`CsvPairDataset` reads ``.csv`` (``.tsv``: tab-separated) with a header row, or JSON
  Lines (``.jsonl``; ``.json`` may also hold one JSON array of objects). Column names are
  options. In JSON a caption may be a list of strings: the first is the caption, the rest its
  ``alternatives``. Captions and labels are stripped of surrounding whitespace.
- :class:`FolderPairDataset` pairs every image (png, jpg, jpeg, webp, bmp) with the ``.txt``
  file of the same stem beside it: its first non-empty line is the caption, further non-empty
  lines are ``alternatives``.

Text. Tables and caption files are UTF-8 (a UTF-8 BOM is dropped; a UTF-16 or UTF-32 BOM
selects that encoding). A byte that does not decode makes its row bad, with the row, line and
column named ("data.csv: row 3 (line 4): not valid UTF-8 (byte 0xe9 at column 7)"); in the
header it is an error of the whole file. A NUL character anywhere in a row, or an unpaired
surrogate (JSON ``"\\ud800"``) in a used value, also makes the row bad. CSV follows Python's
``csv`` module with ``strict=True``: quoted fields may hold delimiters, quotes (``""``) and line
breaks; a row is named by its first line; blank lines are not rows; a row with more fields
than the header is bad (an unquoted delimiter in a caption would otherwise cut it short
silently). Malformed quoting (a quoted field never closed, text after a closing quote) raises
under either policy, since the rows after it cannot be told apart. JSON Lines are split at
``\\n`` only (a raw U+2028 inside a string is fine).

Paths. Image paths are relative to the table's folder, and such a path must stay inside that
folder after resolving ``..`` and symlinks: one that leaves it is a bad row ("image path
../x.png is outside the data folder /data"), so a table someone sent you cannot read files
elsewhere. Absolute paths (and ``~``) are explicit and used as they are. In a folder dataset an
image or caption file that is a symlink to outside the folder is a bad row too. Only regular
files are opened (a FIFO or device is a bad row, never a hang); a dangling symlink or a symlink
loop named like an image is a bad row with its reason; ``recursive=True`` does not enter
symlinked subfolders, so a symlink to a parent cannot loop. Images are decoded by content,
whatever their extension (see :mod:`plait.data.cache`). A file name that is not UTF-8 is shown
with ``\\x`` escapes in messages and ``skipped`` ("caf\\xe9.png").

Every row is checked and its image decoded (into the cache, :mod:`plait.data.cache`) when the
dataset is built, so a bad row stops the run before training, not in epoch 3. A row is bad when
a column is missing, the image is missing, unreadable, truncated or corrupt, the caption is
empty after stripping, a caption file is missing or not UTF-8, or for the reasons above.
``bad_rows="error"`` (default) raises a ValueError naming the file, the row (CSV: 1-based data
row, header excluded, and its first line; JSONL: line number; JSON array: item and line;
folder: image file) and the reason. ``bad_rows="skip"`` leaves bad rows out and lists them in
``skipped`` (dicts with row, source, reason); ``write_skipped(run_dir)`` writes that list to
``run_dir/skipped_rows.json``. Problems of the whole file (it is missing, its header is not
UTF-8 or lacks a named column, malformed quoting) raise under either policy.

Splits. ``split="all"`` (default) is every good row. With ``test_fraction`` > 0 a seeded
permutation of the good rows gives "train" and "test". With neither ``test_fraction`` nor
``test_path``, "train" is every good row and "test" is an *empty* dataset (no items, the same
label keys), so a trainer can skip evaluation. ``CsvPairDataset(test_path=...)`` names a test
table of the same columns (paths relative to its own folder): "train" and "all" are the
``path`` table (the test table is never trained on), "test" is the ``test_path`` table; both
tables are checked whichever split is built. Label class ids come from the sorted union of the
class names of both tables' good rows, so they agree between the splits and a test class
unseen in training is allowed (zero-shot).
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import re
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from plait.atomic import atomic_write_text
from plait.data.base import ImagePairDataset, check_split
from plait.data.cache import ImageCache, file_problem, to_tensor

BAD_ROWS = ("error", "skip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SKIPPED_FILE = "skipped_rows.json"
JSON_WHITESPACE = " \t\r\n"

_BAD_BYTES = "plait-mark-bad-bytes"
# A strict decode never yields a lone surrogate, so each undecodable byte b becomes U+DC00 + b.
codecs.register_error(_BAD_BYTES, lambda exc: ("".join(chr(0xDC00 + b) for b in exc.object[exc.start : exc.end]), exc.end))
_BOMS = (  # UTF-32 before UTF-16: the UTF-32-LE mark starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_SUSPECT = re.compile("[\x00\ud800-\udfff]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_csv_limit_lock = threading.Lock()


def check_bad_rows(bad_rows: str) -> str:
    """``bad_rows`` if it is one of :data:`BAD_ROWS` ("error", "skip"); a ValueError otherwise."""
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {', '.join(map(repr, BAD_ROWS))}, got {bad_rows!r}")
    return bad_rows


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding name): UTF-8 unless a BOM says otherwise; bad bytes become U+DC00 + byte."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(codec, _BAD_BYTES), name
    return data.decode("utf-8", _BAD_BYTES), "UTF-8"


def text_problem(lines: Sequence[str], encoding: str, first_line: int = 1, first_column: int = 1) -> str:
    """Why decoded ``lines`` are not clean text ("" if they are): the first bad byte or NUL.

    The first line is line ``first_line`` of the file and starts at column ``first_column``;
    a problem on it is placed by column only, on a later line by line and column.
    """
    for k, line in enumerate(lines):
        found = _SUSPECT.search(line)
        if not found:
            continue
        column = found.start() + (first_column if k == 0 else 1)
        at = f"column {column}" if k == 0 else f"line {first_line + k}, column {column}"
        char = found.group()
        if char == "\x00":
            return f"contains a NUL character at {at}"
        return f"not valid {encoding} (byte 0x{ord(char) - 0xDC00:02x} at {at})"
    return ""


def _value_problem(value: str, column: str) -> str:
    """A NUL or unpaired surrogate in a value that reached it through a JSON escape."""
    found = _SUSPECT.search(value)
    if not found:
        return ""
    if found.group() == "\x00":
        return f"column {column!r} contains a NUL character"
    return f"column {column!r} contains an unpaired surrogate \\u{ord(found.group()):04x} (not valid Unicode)"


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (lone surrogates) shown as ``\\xe9`` and
    control characters (a newline in a file name) as ``repr`` shows them (``\\n``): a message
    naming a file stays one line."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _inside(path: Path, base: str) -> bool:
    """Whether ``path``, with ``..`` and symlinks resolved, is ``base`` or below it."""
    resolved = os.path.realpath(path)
    return resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep)


@contextmanager
def _csv_field_limit(limit: int):
    """Let csv read fields up to ``limit`` characters (its default stops at 128 KiB)."""
    with _csv_limit_lock:
        previous = csv.field_size_limit()
        csv.field_size_limit(max(previous, limit))
        try:
            yield
        finally:
            csv.field_size_limit(previous)


@dataclass
class _Row:
    """One candidate item: ``row`` is what messages call it (a number or a file name)."""

    row: int | str
    where: str  # "row 3 (line 4)", "line 7", "item 2 (line 3)", "image cat.png"
    image: Path | None = None
    caption: str = ""
    alternatives: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass
class _Table:
    """The rows of one file (or folder), checked and decoded."""

    source: Path
    rows: list[_Row]
    arrays: np.ndarray | None = None
    good: list[int] = field(default_factory=list)
    position: dict[int, int] = field(default_factory=dict)

    @property
    def skipped(self) -> list[dict]:
        def shown(row):
            return printable(row) if isinstance(row, str) else row

        source = printable(str(self.source))
        return [{"row": shown(r.row), "source": source, "reason": printable(r.error)} for r in self.rows if r.error]


def _caption_parts(value, column: str) -> tuple[str, list[str], str]:
    """(caption, alternatives, error) from a caption cell: a string or, in JSON, a list of strings."""
    if value is None:
        return "", [], f"missing column {column!r}"
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return "", [], f"column {column!r} must be a string or a list of strings"
        texts = [v.strip() for v in value if v.strip()]
    elif isinstance(value, str):
        texts = [value.strip()] if value.strip() else []
    else:
        return "", [], f"column {column!r} must be a string, got {type(value).__name__}"
    for text in texts:
        problem = _value_problem(text, column)
        if problem:
            return "", [], problem
    if not texts:
        return "", [], f"empty caption in column {column!r}"
    return texts[0], list(dict.fromkeys(t for t in texts[1:] if t != texts[0])), ""


class _UserDataset(ImagePairDataset):
    """Shared checking, decoding, bad-row policy and splitting of the user datasets."""

    @staticmethod
    def _check(table: _Table, image_size: int, bad_rows: str, cache_dir) -> _Table:
        """Decode the images of ``table``'s rows, apply the bad-row policy; fills arrays and good."""
        rows = table.rows
        to_decode = [n for n, r in enumerate(rows) if not r.error and r.image is not None]
        arrays, errors = ImageCache(cache_dir).load([rows[n].image for n in to_decode], image_size)
        for n, error in zip(to_decode, errors):
            if error:
                rows[n].error = error
        bad = [r for r in rows if r.error]
        if bad and bad_rows == "error":
            more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
            message = f"{table.source}: {bad[0].where}: {bad[0].error}{more}; pass bad_rows='skip' to skip bad rows"
            raise ValueError(printable(message))
        table.good = [n for n, r in enumerate(rows) if not r.error]
        if not table.good:
            raise ValueError(printable(f"{table.source}: no usable rows ({len(rows)} rows, {len(bad)} bad)"))
        table.arrays = arrays
        table.position = {n: k for k, n in enumerate(to_decode)}
        return table

    def _build(
        self,
        tables: list[_Table],
        image_size: int,
        bad_rows: str,
        cache_dir,
        split: str,
        test_fraction: float,
        seed: int,
        label_columns: Sequence[str] = (),
    ) -> None:
        """``tables``: [main] or [main, test table]; builds this dataset as ``split`` of them."""
        check_split(split)
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        for table in tables:
            self._check(table, image_size, bad_rows, cache_dir)
        table = tables[1] if split == "test" and len(tables) > 1 else tables[0]
        good = table.good
        keep = np.arange(len(good))
        if len(tables) == 1 and test_fraction > 0:
            order = np.random.default_rng(seed).permutation(len(good))
            n_test = int(round(test_fraction * len(good)))
            test = np.sort(order[:n_test])
            train = np.sort(order[n_test:])
            keep = {"train": train, "test": test, "all": keep}[split]
            if keep.size == 0:
                raise ValueError(
                    f"{table.source}: the {split} split is empty ({len(good)} usable rows, test_fraction={test_fraction})"
                )
        elif len(tables) == 1 and split == "test":
            keep = np.arange(0)  # no test data asked for: an empty, well-formed dataset
        self.source = table.source
        self.bad_rows = bad_rows
        self.skipped = table.skipped
        chosen = [table.rows[good[k]] for k in keep]
        images = table.arrays[[table.position[good[k]] for k in keep]].reshape(len(keep), image_size, image_size, 3)
        super().__init__(to_tensor(images), [r.caption for r in chosen], [r.alternatives for r in chosen])
        self.split = split
        self.paths = [r.image for r in chosen]
        self.rows = [r.row for r in chosen]
        for column in label_columns:
            names = sorted({t.rows[n].labels[column] for t in tables for n in t.good})
            ids = {name: k for k, name in enumerate(names)}
            self.labels[column] = np.array([ids[r.labels[column]] for r in chosen], dtype=np.int64)
            self.class_names[column] = names

    def write_skipped(self, run_dir: str | os.PathLike) -> Path:
        """Write ``skipped`` to ``run_dir/skipped_rows.json`` (atomically); returns its path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / SKIPPED_FILE
        report = {"source": str(self.source), "bad_rows": self.bad_rows, "count": len(self.skipped), "skipped": self.skipped}
        return atomic_write_text(target, json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.source)!r}, split={self.split!r}, size={len(self)}, skipped={len(self.skipped)})"


def _read_file(path: Path) -> tuple[str, str]:
    """The decoded text of a table (see :func:`decode_text`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return decode_text(data)


class CsvPairDataset(_UserDataset):
    """Image-caption pairs from a CSV/TSV file with a header, or from JSON Lines / a JSON array.

    ``label_columns``: optional columns holding class names, turned into ``labels`` /
    ``class_names`` (sorted names) for zero-shot evaluation; a row missing one is bad.
    ``test_path``: a separate test table (same columns), instead of ``test_fraction``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "image",
        text_column: str = "text",
        image_size: int = 32,
        bad_rows: str = "error",
        cache_dir=None,
        split: str = "all",
        test_fraction: float = 0.0,
        seed: int = 0,
        label_columns: Sequence[str] = (),
        test_path: str | os.PathLike | None = None,
    ):
        check_bad_rows(bad_rows)
        check_split(split)
        if isinstance(label_columns, str):
            label_columns = (label_columns,)
        self.image_column, self.text_column = image_column, text_column
        self.label_columns = tuple(label_columns)
        if test_path is not None and float(test_fraction) > 0:
            raise ValueError(f"give test_path or test_fraction, not both "
                             f"(test_path={str(test_path)!r}, test_fraction={test_fraction!r})")
        paths = [Path(path).expanduser()] + ([Path(test_path).expanduser()] if test_path is not None else [])
        tables = [_Table(p, self._parse(p)) for p in paths]
        self.test_path = paths[1] if test_path is not None else None
        self._build(tables, image_size, bad_rows, cache_dir, split, test_fraction, seed, self.label_columns)

    def _parse(self, path: Path) -> list[_Row]:
        """The candidate rows of one table (not yet decoded)."""
        if not path.is_file():
            raise ValueError(f"data file not found: {path}")
        columns = [self.image_column, self.text_column, *self.label_columns]
        suffix = path.suffix.lower()
        records = self._read_json(path, columns) if suffix in (".jsonl", ".json") else self._read_csv(path, columns)
        base = os.path.realpath(path.parent)
        rows = [self._row(n, where, record, path.parent, base, columns) for n, where, record in records]
        if not rows:
            raise ValueError(f"{path}: no data rows")
        return rows

    def _read_csv(self, path: Path, columns: list[str]) -> list[tuple[int, str, object]]:
        text, encoding = _read_file(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        consumed: list[str] = []  # the physical lines of the record being read

        def lines():
            for line in io.StringIO(text, newline=""):
                consumed.append(line)
                yield line

        reader = csv.reader(lines(), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        records: list[tuple[int, str, object]] = []
        with _csv_field_limit(len(text) + 1):
            while True:
                start = reader.line_num + 1
                consumed.clear()
                where = f"row {len(records) + 1} (line {start})" if header is not None else f"header (line {start})"
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise ValueError(
                        f"{path}: {where}: malformed CSV quoting ({exc}); a field that starts with '\"' must end "
                        f"with '\"' before the next {delimiter!r} or line end, and a '\"' inside it is written '\"\"'"
                    ) from None
                if not fields:
                    continue  # a blank line
                problem = text_problem(consumed, encoding, start)
                if header is None:
                    if problem:
                        hint = " (a UTF-16 file without a byte-order mark?)" if "NUL" in problem else "; save the file as UTF-8"
                        raise ValueError(f"{path}: {where}: {problem}{hint}")
                    header = fields
                    self._check_header(path, header, columns)
                    continue
                if problem:
                    record: object = ValueError(problem)
                elif len(fields) > len(header):
                    record = ValueError(
                        f"{len(fields)} fields but the header has {len(header)} (quote a field that contains {delimiter!r})"
                    )
                else:
                    record = dict(zip(header, fields))
                records.append((len(records) + 1, where, record))
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row with columns {', '.join(map(repr, columns))}")
        return records

    @staticmethod
    def _check_header(path: Path, header: list[str], columns: list[str]) -> None:
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: header has no column {', '.join(map(repr, missing))}; its columns: "
                f"{', '.join(map(repr, header))} (set image_column= / text_column= to match)"
            )
        twice = sorted({c for c in columns if header.count(c) > 1})
        if twice:
            raise ValueError(f"{path}: header names column {', '.join(map(repr, twice))} more than once")

    def _read_json(self, path: Path, columns: list[str]) -> list[tuple[int, str, object]]:
        text, encoding = _read_file(path)
        if path.suffix.lower() == ".json" and text.lstrip(JSON_WHITESPACE).startswith("["):
            return self._read_json_array(path, text, encoding)
        records: list[tuple[int, str, object]] = []
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip(JSON_WHITESPACE):
                continue
            problem = text_problem([line], encoding)
            if problem:
                record: object = ValueError(problem)
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    record = ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")
                except (ValueError, RecursionError) as exc:  # e.g. an int of > 4300 digits, deep nesting
                    record = ValueError(f"not valid JSON ({type(exc).__name__}: {str(exc) or 'nested too deeply'})")
            records.append((n, f"line {n}", record))
        return records

    @staticmethod
    def _read_json_array(path: Path, text: str, encoding: str) -> list[tuple[int, str, object]]:
        """The items of one JSON array, each with the line it starts on."""
        decoder = json.JSONDecoder()

        def line_at(pos: int) -> int:
            return text.count("\n", 0, pos) + 1

        def column_at(pos: int) -> int:
            return pos - text.rfind("\n", 0, pos)

        def skip(pos: int) -> int:
            while pos < len(text) and text[pos] in JSON_WHITESPACE:
                pos += 1
            return pos

        items: list[tuple[int, str, object]] = []
        pos = skip(skip(0) + 1)  # after '['
        if text[pos : pos + 1] == "]":
            pos = skip(pos + 1)
        else:
            while True:
                n, where = len(items) + 1, f"item {len(items) + 1} (line {line_at(pos)})"
                try:
                    item, end = decoder.raw_decode(text, pos)
                except (ValueError, RecursionError) as exc:
                    stop = max(getattr(exc, "pos", pos) or pos, pos)
                    problem = text_problem(text[pos : stop + 1].split("\n"), encoding, line_at(pos), column_at(pos))
                    detail = getattr(exc, "msg", None) or type(exc).__name__
                    reason = problem or f"not valid JSON ({detail} at line {line_at(stop)}, column {column_at(stop)})"
                    raise ValueError(f"{path}: {where}: {reason}") from None
                segment = text[pos:end].split("\n")
                problem = text_problem(segment, encoding, line_at(pos), column_at(pos))
                items.append((n, where, ValueError(problem) if problem else item))
                pos = skip(end)
                if text[pos : pos + 1] == ",":
                    pos = skip(pos + 1)
                    continue
                if text[pos : pos + 1] == "]":
                    pos = skip(pos + 1)
                    break
                raise ValueError(f"{path}: line {line_at(pos)}: not valid JSON (expected ',' or ']' after item {n})")
        if pos < len(text):
            raise ValueError(f"{path}: line {line_at(pos)}: not valid JSON (extra data after the array)")
        return items

    def _row(self, n, where, record, folder: Path, base: str, columns) -> _Row:
        row = _Row(n, where)
        if isinstance(record, Exception):
            row.error = str(record)
            return row
        if not isinstance(record, dict):
            row.error = f"expected an object with keys {', '.join(map(repr, columns))}, got {type(record).__name__}"
            return row
        missing = [c for c in columns if record.get(c) is None]
        if missing:
            row.error = f"missing column {', '.join(map(repr, missing))}"
            return row
        image = record[self.image_column]
        if not isinstance(image, str) or not image.strip():
            row.error = f"empty image path in column {self.image_column!r}" if isinstance(image, str) else (
                f"column {self.image_column!r} must be a path string, got {type(image).__name__}")
            return row
        image = image.strip()
        row.error = _value_problem(image, self.image_column)
        if row.error:
            return row
        image_path = Path(os.path.expanduser(image))
        if image_path.is_absolute():
            row.image = image_path
        else:
            row.image = folder / image_path
            if not _inside(row.image, base):
                row.error = f"image path {image} is outside the data folder {base}"
                return row
        row.caption, row.alternatives, row.error = _caption_parts(record[self.text_column], self.text_column)
        if row.error:
            return row
        for column in self.label_columns:
            value = record[column]
            value = value.strip() if isinstance(value, str) else json.dumps(value)
            row.error = _value_problem(value, column) or (f"empty label in column {column!r}" if not value else "")
            if row.error:
                return row
            row.labels[column] = value
        return row


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop
        return False


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    """Entries named like images that are not directories (symlinked folders are not entered)."""

    def failed(exc: OSError):
        raise ValueError(f"{folder}: cannot list {exc.filename}: {exc.strerror or exc}")

    found = []
    try:
        if recursive:
            for directory, _, files in os.walk(folder, onerror=failed):
                found += [Path(directory) / name for name in files]
        else:
            with os.scandir(folder) as entries:
                found = [Path(e.path) for e in entries if not _is_dir(e)]
    except OSError as exc:
        failed(exc)
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_caption(caption_file: Path, base: str) -> tuple[str, list[str], str]:
    """(caption, alternatives, error) from a caption file beside an image."""
    name = caption_file.name
    try:
        info = caption_file.stat()
    except FileNotFoundError:
        return "", [], f"caption file {name} not found"
    except OSError as exc:
        reason = "is a symlink loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror or exc})"
        return "", [], f"caption file {name} {reason}"
    if not _inside(caption_file, base):
        return "", [], f"caption file {name} links outside the data folder {base}"
    if not stat.S_ISREG(info.st_mode):
        return "", [], f"caption file {name} is not a regular file"
    try:
        text, encoding = decode_text(caption_file.read_bytes())
    except OSError as exc:
        return "", [], f"cannot read caption file {name}: {exc.strerror or exc}"
    lines = _LINE_BREAK.split(text)
    problem = text_problem(lines, encoding)
    if problem:
        return "", [], f"caption file {name}: {problem.replace(' at column', ' at line 1, column', 1)}"
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return "", [], f"empty caption in {name}"
    return lines[0], list(dict.fromkeys(t for t in lines[1:] if t != lines[0])), ""


class FolderPairDataset(_UserDataset):
    """Images in ``folder`` (with ``recursive``, its subfolders too), each with a same-stem ``.txt``."""

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: int = 32,
        bad_rows: str = "error",
        cache_dir=None,
        split: str = "all",
        test_fraction: float = 0.0,
        seed: int = 0,
        recursive: bool = False,
    ):
        check_bad_rows(bad_rows)
        check_split(split)
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ValueError(f"image folder not found: {folder}")
        images = _list_images(folder, recursive)
        if not images:
            raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        base = os.path.realpath(folder)
        rows = []
        for image in images:
            name = image.relative_to(folder).as_posix()
            row = _Row(name, f"image {name}", image=image)
            problem = file_problem(image)
            if problem:
                row.error = f"image file not found: {image} (a dangling symlink?)" if problem == "missing" else problem
            elif not _inside(image, base):
                row.error = f"image {name} links outside the data folder {base}"
            else:
                row.caption, row.alternatives, row.error = _read_caption(image.with_suffix(".txt"), base)
            rows.append(row)
        self._build([_Table(folder, rows)], image_size, bad_rows, cache_dir, split, test_fraction, seed)
