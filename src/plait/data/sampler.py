"""The training order: a seeded permutation per epoch that a resume replays exactly."""

from __future__ import annotations

import torch


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch that can start mid-epoch: the data order is a pure
    function of (seed, epoch), so resuming at (epoch, batch) replays it exactly.

    Under torchrun (``world_size`` W > 1) ``batch_size`` is the global batch B: of each run of
    B consecutive items of ``order[start:]`` rank r yields rows [r B/W, (r+1) B/W), so the ranks'
    local batches, gathered in rank order, are the global batch one process would read, and a
    resume position (``start``, in items of the global order) means the same under any W."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"a global batch_size divisible by world_size={world_size} is needed, got {batch_size}")
        self.size, self.seed = size, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator)[self.start:]

    def __iter__(self):
        order = self._order()
        if self.world_size == 1:
            return iter(order.tolist())
        full = (order.numel() // self.batch_size) * self.batch_size  # the last partial batch is dropped anyway
        share = self.batch_size // self.world_size
        rows = order[:full].view(-1, self.world_size, share)[:, self.rank]
        return iter(rows.reshape(-1).tolist())

    def __len__(self) -> int:
        remaining = self.size - self.start
        if self.world_size == 1:
            return remaining
        return (remaining // self.batch_size) * (self.batch_size // self.world_size)
