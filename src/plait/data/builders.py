"""Build image-caption datasets from installed packages and write them as a user CSV.

``build_csv_dataset(name, out_dir)`` writes ``out_dir/images/*.png`` and ``out_dir/pairs.csv``
(columns ``image``: the PNG's path relative to the CSV, ``caption``, then label columns), to be
read back by :class:`plait.data.user.CsvPairDataset` (``data.name: csv``; see
``configs/glyphs.yaml``). The CLI is ``plait data build NAME --out DIR``. Names: :data:`BUILDERS`.

The output is deterministic: the same inputs (package versions, ``image_size``, ``limit``) give
the same bytes. Every file goes through :func:`plait.atomic.atomic_write` and ``pairs.csv`` is
written last, so an interrupted build leaves either the previous CSV or none, never half of
one. A PNG whose bytes are already on disk is left as it is (its mtime too, so plait's image
cache stays valid); PNGs of an earlier build that this one does not list are removed.

``glyphs``: one image per character of DejaVu Sans (``DejaVuSans.ttf``, shipped with
matplotlib; free licence, redistribution allowed: ``mpl-data/fonts/ttf/LICENSE_DEJAVU``) and
its Unicode name as the caption, e.g. "latin capital letter a with grave",
"braille pattern dots-1245", "arabic letter beh initial form", "rightwards double arrow".
Kept: every code point in the font's character map whose general category is a letter,
number, punctuation or symbol (L*, N*, P*, S*) and that has a Unicode name (Python's
``unicodedata``), except the two emoji blocks ("Emoticons", "Miscellaneous Symbols and
Pictographs"), so the set does not overlap the emoji dataset's pictographs; then characters
whose image is blank or identical, pixel for pixel, to that of an earlier code point (Greek
capital alpha looks like Latin A) are dropped, as no image could tell their captions apart.

Rendering (Pillow's FreeType): black on white, 8-bit grayscale, font size ``0.7 *
image_size`` pixels on a common baseline, so capital and small letters keep their relative
size and position (no per-glyph scaling to the box); each glyph is centred horizontally on its
ink; a glyph whose ink overflows the square is drawn one pixel size smaller until it fits.
Label columns (for ``label_columns`` / ``eval.label``): ``script`` (Unicode script, e.g.
"Latin", "Common"), ``block`` (Unicode block) from ``fontTools.unicodedata`` (fontTools is a
matplotlib dependency), and ``category`` (general category, e.g. "uppercase letter").

``limit`` keeps that many items spread evenly over the code-point order (every script
represented), not the first ones. With matplotlib 3.11, Pillow 13.0, fontTools 4.68 and
Python 3.11 (Unicode 14.0), image_size 32: 5,508 candidates, 5,064 items written (444 blank or
homoglyphs) in 17 scripts, 63 blocks and 19 categories (the CLI prints the count).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from plait._checks import is_int
from plait.atomic import atomic_write, atomic_write_text

CSV_NAME = "pairs.csv"
IMAGE_DIR = "images"
GLYPH_FONT = "DejaVuSans.ttf"
GLYPH_CATEGORIES = ("L", "N", "P", "S")
GLYPH_EXCLUDED_BLOCKS = frozenset({"Emoticons", "Miscellaneous Symbols and Pictographs"})
GLYPH_FONT_SCALE = 0.7
_GLYPH_FILE = re.compile(r"^u[0-9a-f]{4,6}\.png$")

CATEGORY_NAMES = {
    "Lu": "uppercase letter", "Ll": "lowercase letter", "Lt": "titlecase letter", "Lm": "modifier letter",
    "Lo": "other letter", "Nd": "decimal number", "Nl": "letter number", "No": "other number",
    "Pc": "connector punctuation", "Pd": "dash punctuation", "Ps": "open punctuation", "Pe": "close punctuation",
    "Pi": "initial punctuation", "Pf": "final punctuation", "Po": "other punctuation", "Sm": "math symbol",
    "Sc": "currency symbol", "Sk": "modifier symbol", "So": "other symbol",
}


def glyph_font_path() -> Path:
    """The DejaVu Sans font file that ships with matplotlib (the glyphs are rendered from it); a
    ValueError when it is missing."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / GLYPH_FONT
    if not path.is_file():
        raise ValueError(f"font not found: {path} (it ships with matplotlib)")
    return path


def glyph_candidates() -> list[int]:
    """Code points of DejaVu Sans kept before rendering (category, name and block filters), sorted."""
    from fontTools import unicodedata as ftu
    from matplotlib.ft2font import FT2Font

    kept = []
    for code in sorted(FT2Font(str(glyph_font_path())).get_charmap()):
        char = chr(code)
        if unicodedata.category(char)[0] not in GLYPH_CATEGORIES or not unicodedata.name(char, ""):
            continue
        if ftu.block(char) in GLYPH_EXCLUDED_BLOCKS:
            continue
        kept.append(code)
    return kept


@lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(glyph_font_path()), size)


def render_glyph(char: str, image_size: int) -> np.ndarray:
    """``char`` drawn black on white: uint8 (image_size, image_size); see the module docstring."""
    from PIL import Image, ImageDraw

    size = max(1, round(GLYPH_FONT_SCALE * image_size))
    while True:
        font = _font(size)
        ascent, descent = font.getmetrics()
        baseline = (image_size - (ascent + descent)) // 2 + ascent
        left, top, right, bottom = font.getbbox(char, anchor="ls")
        fits = right - left <= image_size and baseline + top >= 0 and baseline + bottom <= image_size
        if fits or size <= 4:
            break
        size -= 1
    image = Image.new("L", (image_size, image_size), 255)
    x = (image_size - (right - left)) // 2 - left
    ImageDraw.Draw(image).text((x, baseline), char, fill=0, font=font, anchor="ls")
    return np.asarray(image)


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def _glyph_items(image_size: int, limit: int | None) -> tuple[list[dict], dict[str, bytes]]:
    from fontTools import unicodedata as ftu

    rows, images, seen = [], {}, set()
    for code in glyph_candidates():
        char = chr(code)
        pixels = render_glyph(char, image_size)
        if pixels.min() == 255:  # blank: nothing drawn
            continue
        key = pixels.tobytes()
        if key in seen:  # a homoglyph of an earlier code point
            continue
        seen.add(key)
        file = f"{IMAGE_DIR}/u{code:04x}.png"
        rows.append({
            "image": file,
            "caption": unicodedata.name(char).lower(),
            "script": ftu.script_name(ftu.script(char)),
            "block": ftu.block(char),
            "category": CATEGORY_NAMES[unicodedata.category(char)],
        })
        images[file] = pixels
    if limit is not None and limit < len(rows):
        rows = [rows[k * len(rows) // limit] for k in range(limit)]
    return rows, {row["image"]: _png_bytes(images[row["image"]]) for row in rows}


BUILDERS: dict[str, Callable[[int, int | None], tuple[list[dict], dict[str, bytes]]]] = {
    "glyphs": _glyph_items,
}


def build_csv_dataset(name: str, out_dir: Path, image_size: int = 32, limit: int | None = None) -> Path:
    """Write dataset ``name`` (a key of :data:`BUILDERS`) to ``out_dir``; returns ``out_dir/pairs.csv``."""
    key = str(name).lower()
    if key not in BUILDERS:
        raise ValueError(f"unknown dataset to build {name!r}; valid names: {', '.join(sorted(BUILDERS))}")
    if not (is_int(image_size) and image_size >= 8):
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if limit is not None and not (is_int(limit) and limit >= 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    rows, pngs = BUILDERS[key](image_size, limit)
    out_dir = Path(out_dir).expanduser()
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for file, data in pngs.items():
        target = out_dir / file
        if target.is_file() and target.read_bytes() == data:
            continue
        atomic_write(target, lambda handle, data=data: handle.write(data))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = atomic_write_text(out_dir / CSV_NAME, buffer.getvalue())
    for stale in (out_dir / IMAGE_DIR).iterdir():
        if _GLYPH_FILE.match(stale.name) and f"{IMAGE_DIR}/{stale.name}" not in pngs:
            stale.unlink()
    return path
