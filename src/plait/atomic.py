"""Atomic file writes: the whole new file, or the old one untouched.

``atomic_write(path, write)`` writes a temporary ``.<name>.tmp-*`` beside ``path``, fsyncs it,
moves it onto ``path`` with ``os.replace`` and fsyncs the directory, so the rename itself
survives a power cut. A failed write (disk full, permissions, an interrupt) removes the
temporary file; an ``OSError`` becomes a :class:`WriteError` of one line naming the file.
The new file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the
umask), or those of the file it replaces (``mkstemp`` alone would make it ``0o600``).
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_MARK = ".tmp-"  # temporary files are named f".{name}{TEMP_MARK}<random>"


class WriteError(OSError, ValueError):
    """A file could not be written (disk full, no permission, ...); the previous file, if any, is
    unchanged. An ``OSError`` (``errno`` kept) and a ``ValueError``, so the command line reports
    it as one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def display_path(path) -> str:
    """A path for a one-line message: as it is, or escaped as ``repr`` escapes it when it holds a
    newline or another unprintable character (a file name may; the message must stay one line)."""
    text = str(path)
    return text if text.isprintable() else repr(text)[1:-1]


def temp_files(directory: str | Path) -> list[Path]:
    """The temporary files that interrupted atomic writes left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f".*{TEMP_MARK}*") if p.is_file())


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the platform says it (Linux's
    /proc/self/status), else by setting and restoring it (under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode of the file ``path`` replaces, or ``0o666 & ~umask`` for a new one."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def fsync_directory(directory: str | Path) -> None:
    """fsync a directory (its entries: a rename), where the platform allows it (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], temp_dir: str | Path | None = None) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path`` (or in ``temp_dir``, on the same
    file system: a cache keeps its temporary files in one folder, so a sweep finds those a killed
    process left), fsync it, move it onto ``path`` with ``os.replace`` and fsync the directory; on
    any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` keeps its
    previous content."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if temp_dir is not None:
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=temp_dir if temp_dir is not None else path.parent, prefix=f".{path.name}{TEMP_MARK}")
        try:
            os.fchmod(fd, _new_file_mode(path))
        except (OSError, AttributeError):  # AttributeError: no fchmod (Windows)
            pass
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as error:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            reason = error.strerror or str(error) or type(error).__name__
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"{path.name} was not created"
            raise WriteError(error.errno, f"could not write {display_path(path)}: {reason} ({kept})") from error
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` written to ``path`` as UTF-8, atomically (:func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure written atomically, in the format of ``path``'s suffix."""
    path = Path(path)
    return atomic_write(path, lambda handle: figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=dpi))
