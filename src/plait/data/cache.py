"""Decode, resize and cache images, in memory and on disk.

An image becomes a uint8 array (S, S, 3): RGBA (and palette transparency) is composited on white,
the shorter side is resized to S (PIL box filter, i.e. area averaging, when shrinking; bicubic
when enlarging) and the centre S x S is cropped. Decoding is the slow part of loading a dataset,
so results are kept:

- per image, as ``images/<S>/<kk>/<key>.npy``, key = sha256(absolute path, mtime, size, S);
- per list of images (one dataset), as ``bundles/<key>.npz`` holding all arrays and the decode
  error of each image (empty string when it decoded), key = sha256 of the image keys;
- the last few bundles in memory, so building a second split in the same process is free.

The disk cache lives in ``$PLAIT_CACHE``, else ``~/.cache/plait``; files are written to a
temporary name and moved into place with ``os.replace``, so a crash never leaves a torn file.
An unwritable cache directory only costs speed (a warning), never the run.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from plait.atomic import atomic_write

CACHE_VERSION = "1"  # bump when decoding changes, so old cache files are not reused
MEMORY_BUNDLES = 8

_memory: OrderedDict[str, tuple[np.ndarray, list[str]]] = OrderedDict()


def default_cache_dir() -> Path:
    """``$PLAIT_CACHE`` if set, else ``~/.cache/plait``."""
    env = os.environ.get("PLAIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plait"


def clear_memory_cache() -> None:
    """Forget the in-memory bundles (the disk cache stays)."""
    _memory.clear()


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 (S, S, 3); raises OSError/ValueError if it cannot."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError("image has zero size")
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).copy()


def _image_key(path: Path, image_size: int) -> tuple[str | None, str]:
    """(cache key, error): key is None when the file cannot be used."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except OSError as exc:
        return None, f"cannot read image file {path}: {exc}"
    if not path.is_file():
        return None, f"image path is not a file: {path}"
    text = f"{CACHE_VERSION}|{os.path.abspath(path)}|{stat.st_mtime_ns}|{stat.st_size}|{image_size}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest(), ""


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
        self.per_image = per_image
        self._warned = False
        self.decoded = 0  # images decoded by this object (0 when everything came from a cache)

    def load(self, paths: Sequence[str | os.PathLike], image_size: int) -> tuple[np.ndarray, list[str]]:
        """Images (N, S, S, 3) uint8 and one error string per path ("" when it decoded).

        A path that is missing or does not decode gives an all-zero image and its error.
        """
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        paths = [Path(p) for p in paths]
        keys, errors = [], []
        for path in paths:
            key, error = _image_key(path, image_size)
            keys.append(key)
            errors.append(error)
        bundle_text = "\n".join(f"{k}" if k else f"missing|{p}" for k, p in zip(keys, paths))
        bundle_key = hashlib.sha256(f"{CACHE_VERSION}|{image_size}|{bundle_text}".encode("utf-8", "surrogateescape")).hexdigest()

        if bundle_key in _memory:
            _memory.move_to_end(bundle_key)
            images, cached_errors = _memory[bundle_key]
            return images, list(cached_errors)
        loaded = self._read_bundle(bundle_key, len(paths), image_size)
        if loaded is None:
            images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
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
                    errors[n] = f"cannot decode image {paths[n]}: {result}"
                    continue
                images[n] = result
                self.decoded += 1
                if self.per_image:
                    self._write(self._image_file(keys[n], image_size), lambda h, a=result: np.save(h, a, allow_pickle=False))
            self._write(
                self._bundle_file(bundle_key),
                lambda h: np.savez(h, images=images, errors=np.array(errors, dtype=str)),
            )
            loaded = images, errors
        _memory[bundle_key] = (loaded[0], list(loaded[1]))
        while len(_memory) > MEMORY_BUNDLES:
            _memory.popitem(last=False)
        return loaded[0], list(loaded[1])

    @staticmethod
    def _decode_all(paths: list[Path], image_size: int) -> list:
        """Decoded arrays, or an error string for each file that does not decode."""

        def one(path):
            try:
                return decode_image(path, image_size)
            except Exception as exc:  # PIL raises many types for corrupt files
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
            atomic_write(file, write)
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
