"""Decode, resize and cache images, in memory and on disk.

Decoding. A file is decoded by its *content*, whatever its extension says (a PNG named
``x.jpg`` is read as the PNG it is), and only as one of PNG, JPEG, WebP, BMP, GIF or TIFF: a
file of another format, or whose content is not recognised, is a decode error (so random bytes
are never taken for a headerless format such as TGA). A truncated or corrupt file is an error
too, never a partly grey or black image: truncated data is refused even if the caller set
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, and an image of more than ``PIL.Image.MAX_IMAGE_PIXELS``
pixels is refused as a likely decompression bomb. The first frame of an animation is used.

Every mode becomes 8-bit RGB, a uint8 array (S, S, 3):

- 16-bit grey ("I;16*") and 32-bit integer grey ("I"): ``round(clip(v, 0, 65535) / 257)``, so
  65535 is 255 and the whole 16-bit range is kept (PIL's own conversion clips at 255);
- float grey ("F"): taken as 0..1, ``round(clip(v, 0, 1) * 255)`` (NaN is 0);
- 16-bit RGB(A) and grey+alpha PNGs: PIL keeps the high byte of each value (``v >> 8``, within
  1 of v / 257);
- "1" is 0 or 255, "L" is repeated in R, G and B, palette ("P") is looked up, "CMYK", "YCbCr",
  "HSV", "LAB" go through PIL's conversion to RGB;
- alpha (RGBA, LA, PA, premultiplied RGBa/La, palette or colour-key transparency, a 16-bit grey
  colour key) is composited on white: ``round((c * a + 255 * (255 - a)) / 255)``. (PIL cannot
  apply the colour key of a 16-bit RGB PNG correctly, as it compares it with the 8-bit values.)

EXIF orientation is applied, then the shorter side is resized to S (PIL box filter, i.e. area
averaging, when shrinking; bicubic when enlarging) and the centre S x S is cropped.

Caching. Decoding is the slow part of loading a dataset, so results are kept:

- per image, as ``images/<S>/<kk>/<key>.npy``, key = blake2b(CACHE_VERSION, Pillow's version,
  S, the file's bytes): the content, not its path, size or mtime, so a file rewritten in place
  (even with its mtime restored) is decoded again, and identical files share one entry. Hashing
  reads every file on every load: 36 ms for 3,000 PNGs of 3 KB in the OS file cache, against
  15 ms for a key of size and mtime (a warm load of them takes 45 ms instead of 24 ms);
- per list of images (one dataset), as ``bundles/<key>.npz`` holding all arrays and the decode
  error of each image (empty string when it decoded), key = sha256 of the image keys;
- the last few bundles in memory, so building a second split in the same process is free.

Non-regular files (directories, FIFOs, devices) are errors and never opened, so a path to a
pipe cannot hang a load; a symlink loop is an error. The disk cache lives in ``$PLAIT_CACHE``,
else ``~/.cache/plait``; files are written to a temporary name in its ``tmp/`` folder and moved
into place with ``os.replace``, so a crash never leaves a torn file; temporary files that a killed
process left there are removed when a cache directory is first opened in a process, once they
are an hour old (younger ones may be another process's writes in progress). An unwritable cache
directory only costs speed (a warning), never the run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL
import torch
from PIL import Image, ImageFile, ImageOps

from plait._checks import is_int
from plait.atomic import atomic_write

CACHE_VERSION = "2"  # bump when decoding changes, so old cache files are not reused
MEMORY_BUNDLES = 8
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # decoded by content, whatever the extension
FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
ALPHA_MODES = ("RGBA", "LA", "PA")
PREMULTIPLIED_MODES = ("RGBa", "La")

_memory: OrderedDict[str, tuple[np.ndarray, list[str]]] = OrderedDict()
STALE_TEMP_SECONDS = 3600  # a temporary file in the cache's tmp/ older than this was left by a killed process
_swept: set[str] = set()  # cache directories whose stale temporary files this process has removed


def remove_stale_temp_files(directory: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the temporary files older than ``older_than`` seconds in ``directory/tmp`` (writes
    that a killed process never finished); returns them. Errors (a file another process removed,
    no permission) are ignored: the sweep only saves disk space."""
    import time

    folder = Path(directory) / "tmp"
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def default_cache_dir() -> Path:
    """``$PLAIT_CACHE`` if set, else ``~/.cache/plait``."""
    env = os.environ.get("PLAIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plait"


def clear_memory_cache() -> None:
    """Forget the in-memory bundles (the disk cache stays)."""
    _memory.clear()


@contextmanager
def _strict_decoding():
    """Refuse truncated files and decompression bombs for the duration."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((c * a + 255 * (255 - a)) / 255) for uint8 colour (H, W, 3) and alpha (H, W)."""
    a = alpha.astype(np.int32)[..., None]
    return ((rgb.astype(np.int32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> uint8 (H, W, 3), alpha on white (see the module doc)."""
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        if mode == "F":
            grey = np.rint(np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0, 1.0) * 255)
        else:
            values = values.astype(np.int64)
            grey = np.rint(np.clip(values, 0, 65535) / 257)  # v / 257 is never exactly x.5
        rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        if mode != "F" and isinstance(transparency, int):
            return _composite_on_white(rgb, np.where(values == transparency, 0, 255))
        return rgb
    if mode in PREMULTIPLIED_MODES:
        values = np.asarray(image).astype(np.int32)
        colour = values[..., :-1] if mode == "RGBa" else np.repeat(values[..., :1], 3, axis=2)
        alpha = values[..., -1:]
        return np.clip(colour + 255 - alpha, 0, 255).astype(np.uint8)  # premultiplied c*a/255 over white
    if mode in ALPHA_MODES or transparency is not None:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    return np.asarray(image.convert("RGB"))


def _decode_error(exc: BaseException, fmt: str | None) -> str:
    """A one-line reason for a file that does not decode."""
    if isinstance(exc, PIL.UnidentifiedImageError):
        return f"not a {FORMAT_NAMES} image (its content is not recognised)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image too large ({exc})"
    text = str(exc) or type(exc).__name__
    what = f"{fmt} file" if fmt else "file"
    return f"truncated or corrupt {what} ({text})"


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 (S, S, 3); raises ValueError (or OSError) if it cannot."""
    fmt = None
    try:
        with _strict_decoding(), Image.open(path, formats=FORMATS) as image:
            fmt = image.format
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb_array(image)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        raise ValueError(_decode_error(exc, fmt)) from exc
    height, width = rgb.shape[:2]
    if width == 0 or height == 0:
        raise ValueError("image has zero size")
    image = Image.fromarray(rgb, "RGB")
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).copy()


def file_problem(path: Path) -> str:
    """Why ``path`` cannot be read as an image file ("" when it can, "missing" when it does not
    exist); never opens it, so a FIFO cannot block."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"image path is a symlink loop: {path}"
        return f"cannot read image file {path}: {exc.strerror or exc}"
    except ValueError as exc:  # an embedded NUL byte
        return f"invalid image path {str(path)!r}: {exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"image path is not a file: {path}"
    return ""


def _image_key(path: Path, image_size: int) -> tuple[str | None, str]:
    """(cache key from the file's content, error): key is None when the file cannot be used."""
    problem = file_problem(path)
    if problem == "missing":
        return None, f"image file not found: {path}"
    if problem:
        return None, problem
    prefix = f"{CACHE_VERSION}|{PIL.__version__}|{image_size}|".encode()
    digest = hashlib.blake2b(prefix, digest_size=20)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        return None, f"cannot read image file {path}: {exc.strerror or exc}"
    return digest.hexdigest(), ""


class ImageCache:
    """Load lists of images as uint8 arrays, decoding each file only once across runs.

    ``cache_dir``: a folder, None for :func:`default_cache_dir`, or False for memory only.
    ``per_image=False`` keeps bundles only (for files that never change one by one, such as
    images shipped in a package): half the disk and writes, no reuse across selections.
    """

    def __init__(self, cache_dir: str | os.PathLike | None | bool = None, per_image: bool = True):
        if cache_dir is False:
            self.directory = None
        elif cache_dir is None or cache_dir is True:
            self.directory = default_cache_dir()
        else:
            self.directory = Path(cache_dir).expanduser()
        if self.directory is not None and str(self.directory) not in _swept:
            _swept.add(str(self.directory))
            remove_stale_temp_files(self.directory)
        self.per_image = per_image
        self._warned = False
        self.decoded = 0  # images decoded by this object (0 when everything came from a cache)

    def load(self, paths: Sequence[str | os.PathLike], image_size: int) -> tuple[np.ndarray, list[str]]:
        """Images (N, S, S, 3) uint8 and one error string per path ("" when it decoded).

        A path that is missing, not a regular file or does not decode gives an all-zero image
        and its error, which names the path.
        """
        if not (is_int(image_size) and image_size >= 1):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        paths = [Path(p) for p in paths]
        keys, errors = [], []
        for path in paths:
            key, error = _image_key(path, image_size)
            keys.append(key)
            errors.append(error)
        bundle_text = "\n".join(k or "-" for k in keys)
        bundle_key = hashlib.sha256(f"{CACHE_VERSION}|{image_size}|{bundle_text}".encode()).hexdigest()

        if bundle_key in _memory:
            _memory.move_to_end(bundle_key)
            images, reasons = _memory[bundle_key]
            return images, self._messages(paths, errors, reasons)
        loaded = self._read_bundle(bundle_key, len(paths), image_size)
        if loaded is None:
            images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
            reasons = [""] * len(paths)  # decode errors, without the path (the bundle may serve other paths)
            todo = []
            for n, key in enumerate(keys):
                if key is None:
                    continue
                array = self._read_image(key, image_size) if self.per_image else None
                if array is None:
                    todo.append(n)
                else:
                    images[n] = array
            for n, result in zip(todo, self._decode_all([paths[n] for n in todo], image_size)):
                if isinstance(result, str):
                    reasons[n] = result
                    continue
                images[n] = result
                self.decoded += 1
                if self.per_image:
                    self._write(self._image_file(keys[n], image_size), lambda h, a=result: np.save(h, a, allow_pickle=False))
            self._write(
                self._bundle_file(bundle_key),
                lambda h: np.savez(h, images=images, errors=np.array(reasons, dtype=str)),
            )
            loaded = images, reasons
        _memory[bundle_key] = (loaded[0], list(loaded[1]))
        while len(_memory) > MEMORY_BUNDLES:
            _memory.popitem(last=False)
        return loaded[0], self._messages(paths, errors, loaded[1])

    @staticmethod
    def _messages(paths: list[Path], errors: list[str], reasons: list[str]) -> list[str]:
        """One message per path: its file error, else its decode error naming it, else ""."""
        return [e or (f"cannot decode image {p}: {r}" if r else "") for p, e, r in zip(paths, errors, reasons)]

    @staticmethod
    def _decode_all(paths: list[Path], image_size: int) -> list:
        """Decoded arrays, or an error string for each file that does not decode."""

        def one(path):
            try:
                return decode_image(path, image_size)
            except ValueError as exc:
                return str(exc)
            except Exception as exc:  # the file vanished or became unreadable since it was hashed
                return f"{type(exc).__name__}: {exc}"

        return [one(p) for p in paths]

    def _image_file(self, key: str, image_size: int) -> Path | None:
        return None if self.directory is None else self.directory / "images" / str(image_size) / key[:2] / f"{key}.npy"

    def _bundle_file(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / "bundles" / f"{key}.npz"

    def _read_image(self, key: str, image_size: int) -> np.ndarray | None:
        file = self._image_file(key, image_size)
        if file is None or not file.is_file():
            return None
        try:
            array = np.load(file, allow_pickle=False)
        except Exception:
            return None
        return array if array.shape == (image_size, image_size, 3) and array.dtype == np.uint8 else None

    def _read_bundle(self, key: str, n: int, image_size: int) -> tuple[np.ndarray, list[str]] | None:
        file = self._bundle_file(key)
        if file is None or not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                images, errors = data["images"], [str(e) for e in data["errors"]]
        except Exception:
            return None
        if images.shape != (n, image_size, image_size, 3) or images.dtype != np.uint8 or len(errors) != n:
            return None
        return images, errors

    def _write(self, file: Path | None, write) -> None:
        if file is None:
            return
        try:
            atomic_write(file, write, temp_dir=self.directory / "tmp")
        except OSError as exc:
            if not self._warned:
                warnings.warn(f"plait: cannot write the image cache in {self.directory} ({exc}); continuing without it")
                self._warned = True


def load_images(paths: Sequence[str | os.PathLike], image_size: int, cache_dir=None) -> tuple[np.ndarray, list[str]]:
    """Shorthand for ``ImageCache(cache_dir).load(paths, image_size)``."""
    return ImageCache(cache_dir).load(paths, image_size)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) array -> contiguous uint8 torch tensor (N, 3, S, S)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
