"""A run's metrics log: ``metrics.jsonl`` (one JSON record a line, appended; TensorBoard too if
asked), the loss window between two log lines, and the truncation a resume makes.

Records are written by rank 0 only. A record's non-finite floats become ``null`` (strict JSON).
The loss window (the losses and samples of the steps since the last log line) is part of a
checkpoint, so a resumed run logs the same mean loss as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from plait import distributed
from plait.atomic import WriteError, atomic_write_text, display_path


def finite_or_none(record: dict) -> dict:
    """A metrics record with non-finite floats as null: strict JSON (``NaN`` is not JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class LossWindow:
    """The steps since the last log line: their losses (detached scalars; a skipped step has
    none), their samples, and the wall-clock start of the window."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor | None, samples: int) -> None:
        """One step's detached loss (None: a skipped step) and its local batch size."""
        self.samples += samples
        if loss is not None:
            self.losses.append(loss)

    def record(self, step: int, epoch: int, terms: dict, lr: float, logit_scale: float, world_size: int,
               skipped_steps: int | None) -> dict:
        """The log line closing the window: mean loss (None if every step was skipped), lr, logit
        scale, throughput of the global batch, the skipped steps (``on_nonfinite=skip``) and the
        last step's named terms; under torchrun the ranks' means of the loss and the terms."""
        elapsed = time.perf_counter() - self.start
        mean_loss = torch.stack(self.losses).mean().item() if self.losses else None
        terms = {key: float(value) for key, value in terms.items()}  # the named terms of the last step taken
        if world_size > 1:  # the ranks' own terms (fusion's ITM, MLM) differ: their means
            shown = [mean_loss if mean_loss is not None else 0.0, *terms.values()]
            means = distributed.all_mean(shown)
            mean_loss = means[0] if mean_loss is not None else None
            terms = dict(zip(terms, means[1:]))
        record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr, "logit_scale": logit_scale,
                  # every rank's samples: the global batch
                  "samples_per_s": self.samples * world_size / max(elapsed, 1e-9)}
        if skipped_steps is not None:
            record["skipped_steps"] = skipped_steps
        record.update(terms)
        return record

    def start_clock(self) -> None:
        """Time the window from now (the losses and samples stay: a resumed run's window goes on)."""
        self.start = time.perf_counter()

    def reset(self) -> None:
        """Empty the window after a log line."""
        self.losses.clear()
        self.samples = 0
        self.start_clock()

    def state_dict(self) -> dict:
        """The window as plain values, for a checkpoint's ``progress``."""
        return {"window_losses": [float(x) for x in self.losses], "window_samples": self.samples}

    def load_state_dict(self, progress: dict) -> None:
        """The window of a checkpoint's ``progress`` (checked by ``plait.training.state``)."""
        self.losses[:] = [torch.tensor(x, dtype=torch.float32) for x in progress.get("window_losses", [])]
        self.samples = int(progress.get("window_samples", 0))


class MetricsLog:
    """``run_dir/metrics.jsonl`` (and ``run_dir/tensorboard`` with ``tensorboard=True``), written
    by the main process; ``lines`` counts this run's lines (a checkpoint stores it). ``fresh``: the
    first record replaces the file (atomically) instead of appending to it, for a command that
    starts over in its directory (``plait finetune``)."""

    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool, fresh: bool = False):
        self.run_dir, self.is_main, self.tensorboard, self.fresh = Path(run_dir), is_main, tensorboard, fresh
        self.lines = 0
        self._writer = None

    @property
    def path(self) -> Path:
        """``run_dir/metrics.jsonl``."""
        return self.run_dir / "metrics.jsonl"

    def append(self, record: dict, last_good: str | None = None) -> None:
        """Append ``record`` (rank 0 only); a write that fails is one WriteError naming the file
        (and ``last_good``, where the last good checkpoint is)."""
        if not self.is_main:
            return
        line = json.dumps(finite_or_none(record)) + "\n"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.fresh and self.lines == 0:
                atomic_write_text(self.path, line)
            else:
                with open(self.path, "a") as handle:
                    handle.write(line)
        except OSError as error:  # a full disk, a read-only directory: one line (a resume drops a torn line)
            where = f"step {record.get('step')}" + (f"; {last_good}" if last_good else "")
            raise WriteError(error.errno, f"could not append to {display_path(self.path)}: {error.strerror or error} "
                                          f"({where})") from None
        self.lines += 1
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        prefix = "eval/" if record.get("split") == "eval" else "train/"
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self._writer.add_scalar(prefix + key, value, record["step"])

    def truncate(self, step: int, count: int | None = None) -> None:
        """Keep the lines logged before a checkpoint of ``step`` (its first ``count``, when the
        checkpoint says), without those of later steps or unreadable (torn) ones, atomically: a
        resumed run logs no record twice."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines[:count] if isinstance(count, int) and 0 <= count <= len(lines) else lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write_text(self.path, "".join(keep))
        self.lines = len(keep)

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
