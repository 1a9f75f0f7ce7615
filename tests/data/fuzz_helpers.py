"""Test helpers: image files written byte by byte, and the pixels a decoder must give for them.

The expectations here are computed with numpy from the arrays the files were written from, not
with the decoder under test: a PNG encoder (any bit depth and colour type), the composite on
white and the 16-bit mapping of :mod:`plait.data.cache`'s docstring.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
LOSSLESS = ("png", "bmp")
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(pixels: np.ndarray, bit_depth: int = 8, transparency: tuple[int, ...] | None = None) -> bytes:
    """A PNG of ``pixels`` (H, W) or (H, W, C), C in 1-4, 8 or 16 bits, filter 0, optional tRNS key."""
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.astype(">u2" if bit_depth == 16 else "u1").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, COLOUR_TYPES[channels], 0, 0, 0)
    extra = _chunk(b"tRNS", struct.pack(f">{len(transparency)}H", *transparency)) if transparency else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The documented composite on white, in floats: round((c * a + 255 * (255 - a)) / 255)."""
    a = alpha.astype(np.float64)[..., None]
    return np.rint((rgb.astype(np.float64) * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def grey16_to_8(values: np.ndarray) -> np.ndarray:
    """The documented 16-bit mapping: round(v / 257), as (H, W, 3)."""
    grey = np.floor(np.clip(values.astype(np.float64), 0, 65535) / 257.0 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def encode(pixels: np.ndarray, ext: str) -> bytes:
    """``pixels`` (H, W, 3) uint8 as a file of format ``ext`` (png, jpg, jpeg, webp, bmp)."""
    buffer = io.BytesIO()
    options = {"quality": 90} if FORMATS[ext] in ("JPEG", "WEBP") else {}
    Image.fromarray(pixels, "RGB").save(buffer, FORMATS[ext], **options)
    return buffer.getvalue()


def reference_pixels(data: bytes) -> np.ndarray:
    """What an intact RGB file decodes to, straight from PIL (for the lossy formats)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# --- a pool of small image files with the pixels they must decode to ------------------------------

SIDE = 6  # every pool image is SIDE x SIDE, loaded at image_size=SIDE: no resizing, exact pixels


def _palette_png(rng, transparent: bool) -> tuple[bytes, np.ndarray]:
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    index = rng.integers(0, 8, (SIDE, SIDE), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    buffer = io.BytesIO()
    if transparent:
        alpha = rng.integers(0, 256, 8, dtype=np.uint8)
        image.save(buffer, "PNG", transparency=alpha.tobytes())
        return buffer.getvalue(), composite(palette[index], alpha[index])
    image.save(buffer, "PNG")
    return buffer.getvalue(), palette[index]


def _good_images() -> dict[str, tuple[str, bytes, np.ndarray]]:
    """name -> (file extension, bytes, expected (SIDE, SIDE, 3) uint8)."""
    rng = np.random.default_rng(2024)
    pool = {}
    for ext in ("png", "bmp", "jpg", "jpeg", "webp"):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        data = encode(pixels, ext)
        pool[f"rgb-{ext}"] = (ext, data, pixels if ext in LOSSLESS else reference_pixels(data))
    grey16 = rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
    pool["grey16-png"] = ("png", png_bytes(grey16, 16), grey16_to_8(grey16))
    rgb16 = rng.integers(0, 65536, (SIDE, SIDE, 3), dtype=np.uint16)
    pool["rgb16-png"] = ("png", png_bytes(rgb16, 16), (rgb16 >> 8).astype(np.uint8))
    rgba = rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    pool["rgba-png"] = ("png", png_bytes(rgba), composite(rgba[..., :3], rgba[..., 3]))
    la = rng.integers(0, 256, (SIDE, SIDE, 2), dtype=np.uint8)
    pool["la-png"] = ("png", png_bytes(la), composite(np.repeat(la[..., :1], 3, axis=2), la[..., 1]))
    for transparent in (False, True):
        data, expected = _palette_png(rng, transparent)
        pool[f"palette{'-alpha' if transparent else ''}-png"] = ("png", data, expected)
    pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    pool["png-named-jpg"] = ("jpg", encode(pixels, "png"), pixels)  # decoded by content
    pool["bmp-named-png"] = ("png", encode(pixels, "bmp"), pixels)
    return pool


GOOD_IMAGES = _good_images()
GOOD_NAMES = sorted(GOOD_IMAGES)
# Intact files of each format to cut short: a cut at or before len - TAIL always removes pixel data
TRUNCATABLE = {ext: encode(np.random.default_rng(7).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), ext)
               for ext in ("png", "jpg", "webp", "bmp")}
TAIL = 24


def truncated_cut_is_always_bad(ext: str, cut: int) -> bool:
    return cut <= len(TRUNCATABLE[ext]) - TAIL
