"""kill -9 at random moments, resume, and end bit for bit where an uninterrupted run ends.

One module-scoped campaign shared by both tests (15-45 s on 2 cores, depending on the load):
the tiny config trained once straight through in this process, then episodes of forked
training processes (no new interpreter: a fork costs milliseconds, an import of torch 2 s),
each SIGKILLed at a seeded random moment and resumed (``plait.training.train(config,
resume=True)``; a fresh start while no checkpoint exists yet) until an attempt runs to its
end, at least 24 kills in all, 8 of them inside a checkpoint write. The kill moments:

- ``time``: a delay uniform over what is left of the run (setup and checkpoint loading, the
  steps with their checkpoint writes, the epoch end, export, evaluation);
- ``write``: inside the n-th checkpoint write of the attempt (the parent polls the run
  directory until the n-th new ``.checkpoint.pt.tmp-*`` file appears, then waits a delay
  shorter than most writes);
- ``export``: inside or just after the ``model.safetensors`` export;
- ``log``: right after the n-th new line of ``metrics.jsonl`` (before the step's checkpoint);
- ``staleness``: right after the epoch end's staleness record (before the epoch checkpoint).

A kill landed inside a write when a temporary file of that attempt is left behind. Before
every resume, ``checkpoint.pt`` and ``model.safetensors`` (when present) must load; the
checkpoint's step never goes back. The forked children run single-threaded, as the straight
run does, so that all of them reduce floats in the same order.

sklearn is imported up front: the digits reader imports it lazily inside ``Trainer.__init__``,
after ``seed_everything``, and that import (sklearn -> rich.style) draws ``getrandbits(24)``
from Python's global RNG, so the first run in a process would store another Python RNG state
than the forked ones (the tensors are not affected).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest
import sklearn.datasets  # noqa: F401  before any run: its import draws from Python's global RNG (module docstring)
import torch

from plait.checkpoint import load_checkpoint, load_weights
from plait.config import load_config
from plait.training import Trainer, train

STEPS = 36  # digits' training split at B = 64: 22 steps an epoch, so every run crosses one epoch end
COMMON = [
    "train.deterministic=true", "train.checkpoint_every_steps=1", f"optim.max_steps={STEPS}", "optim.epochs=3",
    "data.batch_size=64", "data.augment.image=true", "data.augment.text=true", "train.log_every=2",
    "eval.tasks=[retrieval]",
]
MIN_KILLS = 24
MIN_KILLS_IN_WRITES = 8
SEED = 20240611
MODES = ("time", "time", "time", "write", "write", "export", "log", "staleness")
ATTEMPT_TIMEOUT_S = 60.0


def _config(run_dir: Path):
    return load_config("tiny", [f"output_dir={run_dir}", *COMMON])


def _child(run_dir: str, resume: bool) -> None:
    torch.set_num_threads(1)
    train(_config(Path(run_dir)), resume=resume)


def _names(run_dir: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(run_dir)}
    except FileNotFoundError:
        return set()


def _temporaries(run_dir: Path) -> set[str]:
    return {name for name in _names(run_dir) if name.startswith(".") and ".tmp-" in name}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _spin(seconds: float) -> None:
    """A precise short wait (time.sleep rounds up to the scheduler's tick)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def _wait_until(process, predicate) -> bool:
    """Poll ``predicate`` until it holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
    while process.is_alive() and time.monotonic() < deadline:
        if predicate():
            return True
    return False


_PREFIXES = {"checkpoint": ".checkpoint.pt.tmp-", "export": ".model.safetensors.tmp-"}


class _WriteWatch:
    """True once the ``target``-th new temporary file named ``prefix``* has appeared; records
    the lifetime of each one it saw appear and go (a whole write) in ``lifetimes``."""

    def __init__(self, run_dir: Path, prefix: str, target: int, lifetimes: list[float]):
        self.run_dir, self.prefix, self.target, self.lifetimes = run_dir, prefix, target, lifetimes
        self.before, self.born, self.count = _temporaries(run_dir), {}, 0

    def __call__(self) -> bool:
        now = time.perf_counter()
        present = {n for n in _temporaries(self.run_dir) - self.before if n.startswith(self.prefix)}
        for name in present - self.born.keys():
            self.born[name] = now
            self.count += 1
        for name in [n for n in self.born if n not in present]:
            self.lifetimes.append(now - self.born.pop(name))
        return self.count >= self.target


def _new_lines(metrics: Path, start: int) -> list[str]:
    with open(metrics, "rb") as handle:
        handle.seek(start)
        return handle.read().decode("utf-8", "replace").splitlines()


def _strike(process, mode: str, run_dir: Path, rng: random.Random, step: int, timing: dict) -> dict:
    """Wait for the moment ``mode`` names, then SIGKILL; what the moment was, for the report.
    ``timing``: an uninterrupted run's duration and the lifetimes of the temporary files seen so
    far (how long a write takes, measured from outside), by kind."""
    info: dict = {"mode": mode}
    if mode == "time":  # uniform over what is left of the run: setup, the steps left, export and evaluation
        delay = rng.uniform(0.0, timing["full_run_s"] * (1.1 - step / STEPS))
        info["delay_s"] = round(delay, 4)
        process.join(delay)
    elif mode in ("write", "export"):
        kind = "checkpoint" if mode == "write" else "export"
        target = rng.randint(1, max(1, STEPS - step + 2)) if mode == "write" else 1
        lifetimes = sorted(timing[kind])
        # a write lasts 2-35 ms here (fsync); a delay within its first quartile's length mostly lands inside it
        short = lifetimes[len(lifetimes) // 4] if len(lifetimes) >= 4 else timing["full_run_s"] / (4 * STEPS)
        delay = rng.uniform(0.0, short if mode == "write" else 0.003)  # the export: 2 MB, in or just after its write
        info.update(target=target, delay_s=round(delay, 5))
        if _wait_until(process, _WriteWatch(run_dir, _PREFIXES[kind], target, timing[kind])):
            _spin(delay)
    else:  # log / staleness: right after a new line of metrics.jsonl
        metrics = run_dir / "metrics.jsonl"
        start = _size(metrics)
        target = rng.randint(1, max(1, (STEPS - step) // 2 + 2)) if mode == "log" else 1
        info["target"] = target

        def nth_line() -> bool:
            if _size(metrics) <= start:
                return False
            lines = [line for line in _new_lines(metrics, start) if line.strip()]
            if mode == "staleness":
                return any('"split": "staleness"' in line for line in lines)
            return len(lines) >= target

        _wait_until(process, nth_line)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    return info


def _checked_step(run_dir: Path) -> int | None:
    """Load both files a resume would read; the checkpoint's step (None: no checkpoint yet)."""
    if (run_dir / "model.safetensors").exists():
        load_weights(run_dir / "model.safetensors")
    if not (run_dir / "checkpoint.pt").exists():
        return None
    return int(load_checkpoint(run_dir / "checkpoint.pt")["progress"]["step"])


def _equal(x, y) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def _run_episode(context, run_dir: Path, rng: random.Random, kills_wanted: int, first_mode: str | None, choices: tuple,
                 timing: dict, steps_per_epoch: int) -> tuple[list[dict], list[str]]:
    kills, problems, step = [], [], None
    for attempt in range(kills_wanted + 40):
        try:
            now = _checked_step(run_dir)
        except ValueError as error:
            problems.append(f"{run_dir.name}, before attempt {attempt}: a torn file: {error}")
            break
        if step is not None and (now is None or now < step):
            problems.append(f"{run_dir.name}, before attempt {attempt}: the checkpoint went back from step {step} to {now}")
            break
        step = now
        mode = None
        if len(kills) < kills_wanted:
            # a staleness record comes only at the epoch end: not after a resume past it
            modes = choices if (step or 0) < steps_per_epoch else tuple(m for m in choices if m != "staleness") or ("write",)
            mode = first_mode if (attempt == 0 and first_mode) else rng.choice(modes)
        before = _temporaries(run_dir)
        process = context.Process(target=_child, args=(str(run_dir), step is not None), daemon=True)
        process.start()
        info = {} if mode is None else _strike(process, mode, run_dir, rng, step or 0, timing)
        process.join(ATTEMPT_TIMEOUT_S)
        if process.is_alive():  # a hung attempt
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            problems.append(f"{run_dir.name}, attempt {attempt}: still running after {ATTEMPT_TIMEOUT_S} s")
            break
        if process.exitcode == 0:
            return kills, problems
        if process.exitcode != -signal.SIGKILL:
            problems.append(f"{run_dir.name}, attempt {attempt} (resume={step is not None}): exit code {process.exitcode}")
            break
        left = _temporaries(run_dir) - before
        kills.append({**info, "episode": run_dir.name, "from_step": step,
                      "in_checkpoint_write": any(n.startswith(".checkpoint.pt.tmp-") for n in left),
                      "in_export_write": any(n.startswith(".model.safetensors.tmp-") for n in left)})
    else:
        problems.append(f"{run_dir.name}: no attempt ran to its end")
    return kills, problems


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    threads = torch.get_num_threads()
    started = time.perf_counter()
    torch.set_num_threads(1)
    try:
        straight = Trainer(_config(root / "straight"))
        straight.fit()
    finally:
        torch.set_num_threads(threads)
    reference = load_checkpoint(root / "straight" / "checkpoint.pt")
    context = multiprocessing.get_context("fork")

    # one uninterrupted forked run: how long a whole run takes in a child (the kill delays' range)
    t0 = time.perf_counter()
    process = context.Process(target=_child, args=(str(root / "calibration"), False), daemon=True)
    process.start()
    process.join(ATTEMPT_TIMEOUT_S)
    assert process.exitcode == 0, f"an uninterrupted forked run failed (exit code {process.exitcode})"
    full_run_s = time.perf_counter() - t0
    # and resumed once more when finished, as after a kill between the final evaluation's record and
    # the process's end (``plait train`` writes its report there): nothing may change
    process = context.Process(target=_child, args=(str(root / "calibration"), True), daemon=True)
    process.start()
    process.join(ATTEMPT_TIMEOUT_S)
    assert process.exitcode == 0, f"a resume of a finished run failed (exit code {process.exitcode})"
    timing = {"full_run_s": full_run_s, "checkpoint": [], "export": []}

    rng = random.Random(SEED)
    kills, problems, episodes = [], [], [root / "calibration"]
    while len(kills) < MIN_KILLS or sum(k["in_checkpoint_write"] for k in kills) < MIN_KILLS_IN_WRITES:
        if len(episodes) > 25:
            problems.append(f"{len(kills)} kills after {len(episodes)} episodes: fewer than wanted")
            break
        run_dir = root / f"episode{len(episodes)}"
        episodes.append(run_dir)
        # the first episodes open with the two kills that leave a logged record without its checkpoint
        first = {1: "staleness", 2: "log"}.get(len(episodes) - 1)
        choices = MODES if len(kills) < MIN_KILLS else ("write",)  # enough kills, too few inside a write
        got, trouble = _run_episode(context, run_dir, rng, rng.randint(4, 10), first, choices, timing, straight.steps_per_epoch)
        kills += got
        problems += trouble
        if trouble:
            break
    (root / "kills.json").write_text(json.dumps({"timing": timing, "kills": kills, "problems": problems}, indent=1))
    return {"root": root, "straight": straight, "reference": reference, "kills": kills, "problems": problems,
            "episodes": episodes, "timing": timing, "seconds": time.perf_counter() - started}


def test_kill9_at_random_moments_then_resume_is_bitwise_identical(campaign):
    kills, problems = campaign["kills"], campaign["problems"]
    in_checkpoint = sum(k["in_checkpoint_write"] for k in kills)
    in_export = sum(k["in_export_write"] for k in kills)
    timing = campaign["timing"]
    by_mode = {mode: sum(k["mode"] == mode for k in kills) for mode in sorted(set(MODES))}
    print(f"\n{len(kills)} kills in {len(campaign['episodes']) - 1} episodes ({by_mode}); {in_checkpoint} inside a checkpoint "
          f"write, {in_export} inside the safetensors export; an uninterrupted forked run {timing['full_run_s']:.2f} s, "
          f"a checkpoint write {1e3 * statistics.median(timing['checkpoint'] or [0]):.1f} ms "
          f"(median of {len(timing['checkpoint'])}); "
          f"campaign {campaign['seconds']:.1f} s")
    assert problems == []
    assert len(kills) >= MIN_KILLS and in_checkpoint >= MIN_KILLS_IN_WRITES

    straight, reference = campaign["straight"], campaign["reference"]
    model = straight.model.state_dict()
    loss_state = straight.loss_fn.state_dict()
    assert any(v.numel() >= len(straight.train_set) for v in loss_state.values())  # the per-sample state is compared
    expected_eval = json.loads((campaign["root"] / "straight" / "eval.json").read_text())["metrics"]
    for run_dir in campaign["episodes"]:
        final = load_checkpoint(run_dir / "checkpoint.pt")
        assert final["progress"] == reference["progress"], run_dir.name
        assert final["model"].keys() == model.keys()
        for name, tensor in model.items():
            assert torch.equal(final["model"][name], tensor), (run_dir.name, name)
        assert final["loss"].keys() == loss_state.keys()
        for name, tensor in loss_state.items():
            assert torch.equal(final["loss"][name], tensor), (run_dir.name, name)
        for key in ("optimizer", "scheduler", "rng", "augment"):
            assert _equal(final[key], reference[key]), (run_dir.name, key)
        weights, _ = load_weights(run_dir / "model.safetensors")[:2]
        assert weights.keys() == model.keys()
        assert all(torch.equal(weights[name], tensor) for name, tensor in model.items()), run_dir.name
        assert json.loads((run_dir / "eval.json").read_text())["metrics"] == expected_eval, run_dir.name


# means over the steps since the previous record: after a resume from a step between two records,
# the first window holds only the steps since the checkpoint (the rest died with the process)
WINDOWED = ("loss", "samples_per_s")


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WINDOWED} for line in lines if line.strip()]


def test_after_kills_metrics_hold_each_step_once_and_no_temporary_file_remains(campaign):
    """A resume drops the records logged after its checkpoint (each (split, step) once, and the
    file as an uninterrupted run writes it, the per-window means apart), also when a finished
    run is resumed (the calibration run); stale ``.*.tmp-*`` files are gone."""
    assert campaign["problems"] == []
    expected = _records(campaign["root"] / "straight")
    failures = []
    for run_dir in campaign["episodes"]:
        records = _records(run_dir)
        keys = [(r.get("split", "train"), r["step"]) for r in records]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            failures.append(f"{run_dir.name}: logged twice: {duplicates}")
        elif records != expected:
            failures.append(f"{run_dir.name}: {len(records)} records, not the uninterrupted run's {len(expected)}")
        if _temporaries(run_dir):
            failures.append(f"{run_dir.name}: temporary files left: {sorted(_temporaries(run_dir))}")
    assert not failures, "\n".join(failures)
