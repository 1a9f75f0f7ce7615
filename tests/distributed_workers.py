"""Worker functions of tests/test_distributed.py: run in spawned processes that form a gloo group
through the environment torchrun would set (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from plait.models.vision import MLPEncoder

# a small two-tower run on UCI in float64: every comparison of the tests is exact up to rounding
BASE = ["optim.epochs=1", "optim.steps=10", "optim.max_steps=5", "data.batch_size=16", "train.precision=fp64",
        "train.device=cpu", "train.progress=false", "train.log_every=1", "train.checkpoint_every_epochs=0",
        "train.staleness_every_epochs=0", "eval.tasks=[retrieval]", "eval.gallery=0",
        "model.a={name: mlp, hidden: [32], out_dim: 24}", "model.b={name: mlp, hidden: [32], out_dim: 24}",
        "model.embed_dim=16", "data.augment.vector_options={noise: 0.0, drop: 0.0}"]


def train_case(overrides: list[str], resume: str | None = None, config_name: str = "uci") -> dict:
    """Train ``configs/uci.yaml`` with BASE + ``overrides`` (another config: ``overrides`` alone);
    the final parameters, their last gradients, the loss's state and the logged per-step losses."""
    from plait.config import load_config
    from plait.training import Trainer

    config = load_config(config_name, [*BASE, *overrides] if config_name == "uci" else overrides)
    trainer = Trainer(config)
    if resume:
        trainer.resume(resume)
    trainer.fit(overwrite=not resume)
    losses = []
    metrics = Path(config.output_dir) / "metrics.jsonl"
    if trainer.is_main:
        losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "split" not in r]
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "loss": {k: v.detach().clone() for k, v in trainer.loss_fn.state_dict().items()},
            "losses": losses, "step": trainer.step}


def _join(rank: int, world: int, port: int) -> None:
    from plait import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu", timeout_s=120)


def _finish() -> None:
    """End a worker as ``plait`` ends one under torchrun: leave the group behind a barrier, then
    :func:`plait.distributed.exit_now` (an interpreter shutdown beside gloo's threads can abort).
    A worker that raises instead exits through ``mp.spawn``, which reports its traceback."""
    from plait import distributed

    distributed.teardown(finished=True)
    distributed.exit_now(0)


def run_cases(rank: int, world: int, port: int, cases: list[tuple[str, list[str]]], out: str, config_name: str = "uci") -> None:
    """Every (name, overrides) case under this process group; OUT/NAME-rankR.pt each."""
    _join(rank, world, port)
    for name, overrides in cases:
        result = train_case([*overrides, f"output_dir={out}/{name}"], config_name=config_name)
        torch.save(result, f"{out}/{name}-rank{rank}.pt")
    _finish()


def run_resume(rank: int, world: int, port: int, settings: list[str], out: str) -> None:
    """3 steps under this group into OUT/two (then copied to OUT/two-copy for a resume elsewhere);
    resume OUT/two here to step 6; resume OUT/one (3 steps by one process) here to step 6."""
    from plait import distributed

    _join(rank, world, port)
    train_case([*settings, "optim.max_steps=3", f"output_dir={out}/two"])
    distributed.barrier()
    if rank == 0:
        shutil.copytree(f"{out}/two", f"{out}/two-copy")
    distributed.barrier()
    for name in ("two", "one"):
        result = train_case([*settings, "optim.max_steps=6", f"output_dir={out}/{name}"], resume=f"{out}/{name}/checkpoint.pt")
        torch.save(result, f"{out}/resumed-{name}-rank{rank}.pt")
    _finish()


def run_teardown(rank: int, world: int, port: int, out: str) -> None:
    """OUT/teardown-rankR.txt: whether the group exists after ``teardown()`` and after
    ``teardown(finished=True)``."""
    import torch.distributed as dist

    from plait import distributed

    _join(rank, world, port)
    distributed.teardown()
    after_failure = dist.is_initialized()
    distributed.teardown(finished=True)
    Path(out, f"teardown-rank{rank}.txt").write_text(f"{after_failure} {dist.is_initialized()}")
    distributed.exit_now(0)


class FailingMLP(MLPEncoder):
    """An MLP tower that raises (a clear ValueError) at its third training forward on rank 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            self.calls += 1
            if self.calls == 3:
                raise ValueError("injected failure on rank 1 (tests.distributed_workers.FailingMLP)")
        return super().forward(x)


FUSION = ["data.options.image_size=16", "model.fusion={preset: tiny, image_size: 16, queue_size: 48, alpha: 0.4}",
          "data.batch_size=8", "optim.steps=10", "optim.max_steps=4", "train.progress=false", "train.log_every=1",
          "train.checkpoint_every_epochs=0", "train.device=cpu", "eval.tasks=[retrieval]", "eval.gallery=0"]


def run_fusion(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """configs/fusion.yaml (tiny, a queue) for 4 steps under this group; OUT/fusion-rankR.pt holds
    the model's state (momentum encoders, queue), the logged losses and the final metrics."""
    from plait.config import load_config
    from plait.training import Trainer

    _join(rank, world, port)
    config = load_config("fusion", [*FUSION, *overrides, f"output_dir={out}/fusion"])
    trainer = Trainer(config)
    metrics = trainer.fit(overwrite=True)
    torch.save({"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "metrics": metrics, "step": trainer.step}, f"{out}/fusion-rank{rank}.pt")
    _finish()
