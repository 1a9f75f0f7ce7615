"""The training order: a seeded permutation per epoch that a resume replays exactly."""

from __future__ import annotations

import torch


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch that can start mid-epoch: the data order is a pure
    function of (seed, epoch), so resuming at (epoch, batch) replays it exactly."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start
