"""FIFO queues of momentum features and their dataset indices (MoCo, ALBEF), as buffers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plait._checks import is_int


class FeatureQueue(nn.Module):
    """Q slots of momentum image features (Q, E), text features (Q, E) and dataset indices (Q,).

    ``ptr`` is the slot the next row is written to; once the queue is full it is also the oldest
    row, so writing there drops the oldest first (FIFO). Empty slots hold index -1 and are left
    out by ``contents``. Everything is a buffer: ``state_dict()`` saves the queue exactly, and a
    resumed run reads the same negatives. Under DDP, gather the features with their indices from
    every rank before ``enqueue`` (ALBEF's ``concat_all_gather``), so every replica keeps the same queue.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if not (is_int(size) and size >= 0):
            raise ValueError(f"queue_size must be a non-negative integer, got {size!r}")
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, index: Tensor) -> bool:
        """Write B rows at slots ptr, ptr+1, ... (mod Q), then ptr <- (ptr + B) mod Q. With B > Q
        only the last Q rows are kept (as if written one after another). A batch holding a
        non-finite value is not written (it would poison every later step); returns whether written."""
        if self.size == 0:
            return False
        if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
            return False
        count = image.shape[0]
        ptr = int(self.ptr)
        if count > self.size:  # only the last Q rows survive; they start where row count - Q would go
            ptr = (ptr + count - self.size) % self.size
            image, text, index = image[-self.size:], text[-self.size:], index[-self.size:]
        slots = (ptr + torch.arange(image.shape[0], device=self.index.device)) % self.size
        self.image[slots] = image.to(self.image.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.index[slots] = index.to(device=self.index.device, dtype=torch.long)
        self.ptr.fill_((ptr + image.shape[0]) % self.size)
        return True

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """(image (n, E), text (n, E), index (n,)) of the n filled slots, in slot order."""
        filled = self.index >= 0
        if bool(filled.all()):
            return self.image, self.text, self.index
        return self.image[filled], self.text[filled], self.index[filled]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.image.shape[1]}"
