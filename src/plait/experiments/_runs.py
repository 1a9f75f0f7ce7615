"""Run many training configs in parallel processes and collect their evaluations."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path


def run_training(job: tuple[str, tuple[str, ...], dict]) -> dict:
    """Train ``config_name`` with ``overrides`` in this process; return ``tags`` + metrics.

    The checkpoint is deleted afterwards (exported weights, metrics and eval.json stay)."""
    import torch

    from plait.config import load_config
    from plait.train import train

    config_name, overrides, tags = job
    torch.set_num_threads(1)
    config = load_config(config_name, list(overrides))
    run_dir = Path(config.output_dir)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    start = time.perf_counter()
    metrics = train(config)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return {**tags, "run_dir": str(run_dir), "metrics": metrics, "seconds": time.perf_counter() - start}


def run_many(jobs: list[tuple[str, tuple[str, ...], dict]], workers: int = 2) -> list[dict]:
    """``run_training`` over ``jobs``, ``workers`` processes at a time (single-threaded each)."""
    if workers <= 1:
        return [run_training(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap_unordered(run_training, jobs))
