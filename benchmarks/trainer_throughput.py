"""Trainer throughput against a minimal hand-written loop: same model, loss, data, optimiser.

    python benchmarks/trainer_throughput.py [--config emoji] [--steps 60] [--rounds 5] [key=value ...]

Both loops start from the same weights and run ``--steps`` steps per round; the rounds
alternate (trainer, hand loop, trainer, ...) so that machine noise hits both alike. Prints
samples/s of each (median over rounds) and their ratio. The trainer's loop includes everything
it does per step: the resumable sampler, augmentation when configured, logging every
``train.log_every`` steps, the progress bar's bookkeeping (disabled output) and loss statistics.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.config import load_config
from plait.training import Trainer


def hand_loop(trainer: Trainer, steps: int) -> float:
    """The loop a user would write: DataLoader, forward, loss, backward, clip, step. Seconds."""
    model, loss_fn, optimizer = trainer.model, trainer.loss_fn.base, trainer.optimizer
    loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=trainer.config.data.batch_size,
                                         shuffle=True, drop_last=True)
    image_augment = trainer.augment["a"] if trainer.config.data.augment.image else None
    text_augment = trainer.augment["b"] if trainer.config.data.augment.text else None
    done = 0
    start = time.perf_counter()
    while done < steps:
        for index, a, b in loader:
            if image_augment is not None:
                a = image_augment(a)
            if text_augment is not None:
                b = text_augment(list(b), [trainer.train_set.alternatives[i] for i in index.tolist()])
            za, zb, scale = model(a, b)
            loss = loss_fn(za, zb, index=index, logit_scale=scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="emoji")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # no per-epoch staleness pass (a forward pass over the training set that the hand-written loop
    # does not make; its cost is reported separately in the README)
    config = load_config(args.config, ["output_dir=/tmp/plait-throughput", "train.progress=false",
                                       "train.checkpoint_every_epochs=0", "train.staleness_every_epochs=0", *args.overrides])
    trainer = Trainer(config)
    batch = config.data.batch_size
    trainer.train_until(5)  # warm-up
    hand_loop(trainer, 5)
    trainer_times, hand_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        trainer.train_until(trainer.step + args.steps)
        trainer_times.append(time.perf_counter() - start)
        hand_times.append(hand_loop(trainer, args.steps))
    trainer_rate = args.steps * batch / statistics.median(trainer_times)
    hand_rate = args.steps * batch / statistics.median(hand_times)
    print(f"config {args.config} {' '.join(args.overrides)}: B = {batch}, {args.steps} steps x {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| loop | samples/s (median) |")
    print("|---|---|")
    print(f"| plait Trainer | {trainer_rate:.0f} |")
    print(f"| hand-written loop | {hand_rate:.0f} |")
    print(f"\nratio trainer / hand-written: {trainer_rate / hand_rate:.3f}")


if __name__ == "__main__":
    main()
