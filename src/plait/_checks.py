"""Argument checks shared across plait's packages (losses, evaluation)."""

from __future__ import annotations

import torch
from torch import Tensor


def integer_vector(value, name: str, length: int, device: torch.device, shape_note: str = "") -> Tensor:
    """Check an integer tensor of shape (length,); return it as int64 on ``device``.

    ``shape_note`` is appended to the shape error (e.g. " to match the features")."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape ({length},), got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},){shape_note}, got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.long)
