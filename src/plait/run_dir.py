"""A run's output directory: which files are a run's, and never replacing one by accident."""

from __future__ import annotations

import os
from pathlib import Path

from plait.atomic import atomic_write_text, display_path, temp_files

# Files a run writes into output_dir (``--overwrite`` removes these and nothing else); a directory
# holding one of GUARDED is a run that a new one without --resume / --overwrite must not replace.
GUARDED = ("checkpoint.pt", "model.safetensors", "eval.json", "metrics.jsonl")
OUTPUTS = (*GUARDED, "config.yaml", "gallery.npz", "skipped_rows.json", "report.md", "report.html",
           "loss.png", "eval.png", "staleness.png", "gallery.png")

def existing_outputs(run_dir: str | Path) -> list[str]:
    """The files of ``GUARDED`` that ``run_dir`` already holds (another run's results)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [name for name in GUARDED if (run_dir / name).exists()]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_writable(run_dir: Path) -> None:
    """``output_dir`` can be a directory plait writes in: not a file, nor under one, nor read-only."""
    shown = display_path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"output_dir {shown} is a file, not a directory")
    probe = run_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output_dir {shown} cannot be created: {display_path(probe)} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == run_dir else f"cannot be created: {display_path(probe)} is not writable"
        raise ValueError(f"output_dir {shown} {what} (permission denied)")


def check_run_dir(run_dir: str | Path, resume, overwrite: bool) -> None:
    """Refuse to start a new run over another one's files unless told to resume or overwrite, and
    a resume from another run's checkpoint into an ``output_dir`` that holds a run (it would replace
    that run). ``resume``: False, True (``output_dir/checkpoint.pt``) or a checkpoint's path."""
    run_dir = Path(run_dir)
    shown = display_path(run_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in output_dir, "
                         "--overwrite deletes it and starts again")
    _check_writable(run_dir)
    found = existing_outputs(run_dir)
    if found and not resume and not overwrite:
        raise ValueError(f"output_dir {shown} already holds a run ({', '.join(found)}); continue it with --resume, "
                         "or delete it and start again with --overwrite (or choose another output_dir)")
    if found and resume not in (None, False, True) and not _same_file(Path(resume), run_dir / "checkpoint.pt"):
        raise ValueError(f"--resume {display_path(resume)} continues another run's checkpoint, but output_dir {shown} already "
                         f"holds a run ({', '.join(found)}), which the resumed run would replace; resume into an empty "
                         f"output_dir, or continue the run there with --resume alone ({display_path(run_dir / 'checkpoint.pt')})")


def remove_outputs(run_dir: str | Path) -> list[Path]:
    """Delete the files a run writes into ``run_dir`` (``OUTPUTS``, TensorBoard event files,
    temporary files of interrupted writes) and nothing else; returns what was removed."""
    run_dir = Path(run_dir)
    removed = [run_dir / name for name in OUTPUTS if (run_dir / name).is_file()]
    events = run_dir / "tensorboard"
    if events.is_dir():
        removed += [path for path in events.glob("events.out.tfevents.*") if path.is_file()]
    removed += temp_files(run_dir)
    for path in removed:
        path.unlink()
    if events.is_dir() and not any(events.iterdir()):
        events.rmdir()
    return removed


def open_run_dir(run_dir: str | Path, resumed_from, overwrite: bool, config_yaml: str, write_skipped=None) -> None:
    """Make ``run_dir`` this run's: checked (:func:`check_run_dir`), emptied of a previous run's
    files with ``overwrite``, created, cleared of temporary files of interrupted writes, then
    ``config.yaml`` written (and ``skipped_rows.json`` by ``write_skipped``, a user reader's)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resumed_from, overwrite)
    if overwrite:
        remove_outputs(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output_dir {display_path(run_dir)}: {error.strerror or error}") from None
    for stale in temp_files(run_dir):
        stale.unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    if write_skipped is not None:
        write_skipped(run_dir)
