"""Run many training configs in parallel processes and collect their evaluations."""

from __future__ import annotations

import functools
import json
import multiprocessing
import time
from pathlib import Path


def finished_metrics(run_dir: Path, config_yaml: str) -> dict | None:
    """The final metrics of a finished run in ``run_dir`` trained with the settings of ``config_yaml``, else None.

    The saved config is read through the current schema, so keys added since (at their defaults)
    do not count as a difference, nor do settings that cannot change a result (the schema's
    ``NO_EFFECT``: how a run waits, shows or logs)."""
    from plait.config import NO_EFFECT, config_differences, from_yaml, load_config

    saved, evaluation = run_dir / "config.yaml", run_dir / "eval.json"
    if not (saved.is_file() and evaluation.is_file() and (run_dir / "model.safetensors").is_file()):
        return None
    if config_differences(load_config(saved), from_yaml(config_yaml), may_change=NO_EFFECT):
        return None
    return json.loads(evaluation.read_text(encoding="utf-8"))["metrics"]


def run_training(job: tuple[str, tuple[str, ...], dict], reuse: bool = False, threads: int = 1) -> dict:
    """Train ``config_name`` with ``overrides`` in this process; return ``tags`` + metrics.

    With ``reuse`` a run whose directory already holds the final evaluation of the same
    settings (see ``finished_metrics``) is not trained again (``"reused": True`` in the result). The checkpoint is deleted
    afterwards (exported weights, metrics and eval.json stay). ``threads``: torch's intra-op threads."""
    import torch

    from plait.config import load_config, to_yaml
    from plait.training import train

    config_name, overrides, tags = job
    torch.set_num_threads(threads)
    config = load_config(config_name, list(overrides))
    run_dir = Path(config.output_dir)
    if reuse and (metrics := finished_metrics(run_dir, to_yaml(config))) is not None:
        return {**tags, "run_dir": str(run_dir), "metrics": metrics, "seconds": 0.0, "reused": True}
    start = time.perf_counter()
    metrics = train(config, overwrite=True)  # a changed config retrains from scratch
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return {**tags, "run_dir": str(run_dir), "metrics": metrics, "seconds": time.perf_counter() - start}


def run_many(jobs: list[tuple[str, tuple[str, ...], dict]], workers: int = 2, reuse: bool = False,
             threads: int = 1) -> list[dict]:
    """``run_training`` over ``jobs``, ``workers`` processes at a time (``threads`` torch threads each)."""
    work = functools.partial(run_training, reuse=reuse, threads=threads)
    if workers <= 1:
        return [work(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap_unordered(work, jobs))
