"""Samples/s of the trainer with 1 and 2 processes on this machine, and the bytes each step moves.

    python benchmarks/distributed_throughput.py [--config emoji] [--steps 120] [--rounds 3] [key=value ...]

Each round runs ``plait train CONFIG --nproc W`` for W = 1 (one process, 2 threads) and W = 2
(two processes, 1 thread each: the same cores), alternating, the same global batch, ``--steps``
optimizer steps; the rate is the median of the logged ``samples_per_s`` after the first log
window (start-up excluded). Prints the median over rounds of each and their ratio.

Communication per step and rank is computed from the run's model and batch (not measured on
the wire): DDP's ring all-reduce of the gradients sends and receives 2 (W-1)/W x 4 P bytes for P
float32 parameters; the feature all-gather receives (W-1)/W x B x 4 d bytes per gathered (B, d)
field (and as much again in the backward's all-to-all for the fields with gradient), plus the
int64 indices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(config: str, world: int, steps: int, overrides: list[str], out: Path) -> float:
    """Median logged samples/s of one ``plait train --nproc world`` run (after the first window)."""
    threads = str(max(1, 2 // world))
    command = [sys.executable, "-m", "plait", "train", config, f"optim.max_steps={steps}", "train.progress=false",
               "train.checkpoint_every_epochs=0", "train.staleness_every_epochs=0", "eval.tasks=[retrieval]",
               "eval.gallery=0", "train.log_every=10", f"output_dir={out}", *overrides, "--overwrite", "--nproc", str(world)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    rates = [r["samples_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "split" not in r and "samples_per_s" in r]
    return statistics.median(rates[1:])


def communication(config_name: str, overrides: list[str], world: int = 2) -> dict:
    """Bytes per step and rank: gradient all-reduce and feature all-gather (see the module docstring)."""
    from omegaconf import OmegaConf

    from plait.config import load_config
    from plait.data import build_dataset
    from plait.losses.objective import build_objective
    from plait.models import build_model, input_spec

    config = load_config(config_name, overrides)
    train_set = build_dataset(config.data.name, split="train",
                              **(OmegaConf.to_container(config.data.options, resolve=True) or {}))
    objective = build_objective(config, len(train_set))
    model = build_model(OmegaConf.to_container(config.model, resolve=True), input_spec(train_set),
                        independent=objective.needs_independent)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fields = 2 * (2 if objective.needs_augmented else 1)  # (a, b), and (a_aug, b_aug) with augmented views
    batch, share = config.data.batch_size, (world - 1) / world
    features = share * batch * 4 * model.embed_dim * fields * 2 + share * batch * 8  # forward gather + backward all-to-all
    gradients = 2 * share * 4 * params
    return {"parameters": params, "gradient_allreduce_bytes": gradients, "feature_gather_bytes": features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="emoji")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rates = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for world in (1, 2) if round_ % 2 == 0 else (2, 1):
                rates[world].append(run(args.config, world, args.steps, args.overrides, Path(tmp) / f"w{world}"))
                print(f"round {round_ + 1}, {world} process(es): {rates[world][-1]:.0f} samples/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    comm = communication(args.config, args.overrides)
    print(f"\n{args.config}: 1 process (2 threads) {one:.0f} samples/s, 2 processes (1 thread each) {two:.0f} samples/s, "
          f"ratio {two / one:.2f} (median of {args.rounds} rounds)")
    print(f"per step and rank at W = 2: gradient all-reduce {comm['gradient_allreduce_bytes'] / 2**20:.2f} MiB "
          f"({comm['parameters']:,} parameters), feature all-gather {comm['feature_gather_bytes'] / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
