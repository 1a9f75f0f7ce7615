"""Your own image-caption pairs: a CSV/TSV/JSONL table of image paths and captions, or a folder.

- :class:`CsvPairDataset` reads ``.csv`` (``.tsv``: tab-separated) with a header row, or JSON
  Lines (``.jsonl``; ``.json`` may also hold one JSON array of objects). Column names are
  options. Image paths are relative to the table's folder (absolute paths work too). In JSON a
  caption may be a list of strings: the first is the caption, the rest its ``alternatives``.
- :class:`FolderPairDataset` pairs every image (png, jpg, jpeg, webp, bmp) with the ``.txt``
  file of the same stem beside it: its first non-empty line is the caption, further non-empty
  lines are ``alternatives``.

Every row is checked and its image decoded (into the cache, :mod:`plait.data.cache`) when the
dataset is built, so a bad row stops the run before training, not in epoch 3. A row is bad when
a column is missing, the image is missing, unreadable or corrupt, the caption is empty after
stripping, or a caption file is missing or not UTF-8. ``bad_rows="error"`` (default) raises a
ValueError naming the file, the row (CSV: 1-based data row, header excluded, and its line;
JSONL: line number; folder: image file) and the reason. ``bad_rows="skip"`` leaves bad rows out
and lists them in ``skipped`` (dicts with row, source, reason); ``write_skipped(run_dir)``
writes that list to ``run_dir/skipped_rows.json``. Problems of the whole file (it is missing,
not UTF-8, or its header lacks a named column) raise under either policy.

Both have no split of their own: ``split="all"`` (default) is every good row; with
``test_fraction`` > 0 a seeded permutation of the good rows gives "train" and "test".
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from plait.data.base import ImagePairDataset, check_split
from plait.data.cache import ImageCache, to_tensor

from plait.atomic import atomic_write_text

BAD_ROWS = ("error", "skip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SKIPPED_FILE = "skipped_rows.json"


def check_bad_rows(bad_rows: str) -> str:
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {', '.join(map(repr, BAD_ROWS))}, got {bad_rows!r}")
    return bad_rows


@dataclass
class _Row:
    """One candidate item: ``row`` is what messages call it (a number or a file name)."""

    row: int | str
    where: str  # "row 3 (line 4)", "line 7", "image cat.png"
    image: Path | None = None
    caption: str = ""
    alternatives: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    error: str = ""


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
    if not texts:
        return "", [], f"empty caption in column {column!r}"
    return texts[0], list(dict.fromkeys(t for t in texts[1:] if t != texts[0])), ""


class _UserDataset(ImagePairDataset):
    """Shared checking, decoding, bad-row policy and splitting of the user datasets."""

    def _build(
        self,
        rows: list[_Row],
        source: Path,
        image_size: int,
        bad_rows: str,
        cache_dir,
        split: str,
        test_fraction: float,
        seed: int,
        label_columns: Sequence[str] = (),
    ) -> None:
        check_split(split)
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        self.source = source
        self.bad_rows = bad_rows
        to_decode = [n for n, r in enumerate(rows) if not r.error and r.image is not None]
        arrays, errors = ImageCache(cache_dir).load([rows[n].image for n in to_decode], image_size)
        for n, error in zip(to_decode, errors):
            if error:
                rows[n].error = error
        bad = [r for r in rows if r.error]
        if bad and bad_rows == "error":
            more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
            raise ValueError(f"{source}: {bad[0].where}: {bad[0].error}{more}; pass bad_rows='skip' to skip bad rows")
        self.skipped = [{"row": r.row, "source": str(source), "reason": r.error} for r in bad]
        position = {n: k for k, n in enumerate(to_decode)}
        good = [n for n, r in enumerate(rows) if not r.error]
        if not good:
            raise ValueError(f"{source}: no usable rows ({len(rows)} rows, {len(bad)} bad)")

        keep = np.arange(len(good))
        if test_fraction > 0:
            order = np.random.default_rng(seed).permutation(len(good))
            n_test = int(round(test_fraction * len(good)))
            test = np.sort(order[:n_test])
            train = np.sort(order[n_test:])
            keep = {"train": train, "test": test, "all": keep}[split]
        elif split == "test":
            raise ValueError(f"{source}: the test split is empty; pass test_fraction > 0 to hold out rows")
        if keep.size == 0:
            raise ValueError(f"{source}: the {split} split is empty ({len(good)} usable rows, test_fraction={test_fraction})")
        chosen = [rows[good[k]] for k in keep]
        images = arrays[[position[good[k]] for k in keep]]
        super().__init__(to_tensor(images), [r.caption for r in chosen], [r.alternatives for r in chosen])
        self.split = split
        self.paths = [r.image for r in chosen]
        self.rows = [r.row for r in chosen]
        for column in label_columns:
            names = sorted({rows[n].labels[column] for n in good})
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


class CsvPairDataset(_UserDataset):
    """Image-caption pairs from a CSV/TSV file with a header, or from JSON Lines.

    ``label_columns``: optional columns holding class names, turned into ``labels`` /
    ``class_names`` (sorted names) for zero-shot evaluation; a row missing one is bad.
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
    ):
        check_bad_rows(bad_rows)
        check_split(split)
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"data file not found: {path}")
        if isinstance(label_columns, str):
            label_columns = (label_columns,)
        self.image_column, self.text_column = image_column, text_column
        columns = [image_column, text_column, *label_columns]
        if path.suffix.lower() in (".jsonl", ".json"):
            records = self._read_json(path)
        else:
            records = self._read_csv(path, columns)
        rows = [self._row(n, where, record, path.parent, columns, label_columns) for n, where, record in records]
        if not rows:
            raise ValueError(f"{path}: no data rows")
        self._build(rows, path, image_size, bad_rows, cache_dir, split, test_fraction, seed, label_columns)

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not valid UTF-8 ({exc})") from None

    def _read_csv(self, path: Path, columns: list[str]) -> list[tuple[int, str, dict]]:
        text = self._read_text(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{path}: empty file, expected a header row with columns {', '.join(map(repr, columns))}")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: header has no column {', '.join(map(repr, missing))}; its columns: "
                f"{', '.join(map(repr, header))} (set image_column= / text_column= to match)"
            )
        return [(n, f"row {n} (line {reader.line_num})", record) for n, record in enumerate(reader, start=1)]

    def _read_json(self, path: Path) -> list[tuple[int, str, dict]]:
        text = self._read_text(path)
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            return [(n, f"item {n}", item) for n, item in enumerate(items, start=1)]
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")
            records.append((n, f"line {n}", record))
        return records

    def _row(self, n, where, record, folder: Path, columns, label_columns) -> _Row:
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
        image_path = Path(image.strip()).expanduser()
        row.image = image_path if image_path.is_absolute() else folder / image_path
        row.caption, row.alternatives, row.error = _caption_parts(record[self.text_column], self.text_column)
        if row.error:
            return row
        for column in label_columns:
            value = record[column]
            value = value.strip() if isinstance(value, str) else json.dumps(value)
            if not value:
                row.error = f"empty label in column {column!r}"
                return row
            row.labels[column] = value
        return row


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
        files = folder.rglob("*") if recursive else folder.iterdir()
        images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        rows = []
        for image in images:
            name = image.relative_to(folder).as_posix()
            row = _Row(name, f"image {name}", image=image)
            caption_file = image.with_suffix(".txt")
            try:
                text = caption_file.read_bytes().decode("utf-8-sig")
            except FileNotFoundError:
                row.error = f"caption file {caption_file.name} not found"
            except UnicodeDecodeError as exc:
                row.error = f"caption file {caption_file.name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            except OSError as exc:
                row.error = f"cannot read caption file {caption_file.name}: {exc}"
            else:
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                if not lines:
                    row.error = f"empty caption in {caption_file.name}"
                else:
                    row.caption = lines[0]
                    row.alternatives = list(dict.fromkeys(t for t in lines[1:] if t != lines[0]))
            rows.append(row)
        self._build(rows, folder, image_size, bad_rows, cache_dir, split, test_fraction, seed)
