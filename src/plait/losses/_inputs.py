"""Input checks and preparation shared by every loss.

All losses compute in float32 at least (float64 inputs stay float64), so that half-precision
features and temperatures down to 0.01 stay finite; the returned loss has the working dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from plait._checks import integer_vector


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_pair(features_a: Tensor, features_b: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """Check a pair of (B, d) feature tensors, upcast them and optionally L2-normalise rows."""
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(features, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, dim), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features_a.shape != features_b.shape:
        raise ValueError(
            f"features_a has shape {tuple(features_a.shape)} but features_b has shape "
            f"{tuple(features_b.shape)}; they must match"
        )
    if features_a.device != features_b.device:
        raise ValueError(f"features_a is on {features_a.device} but features_b is on {features_b.device}")
    if features_a.shape[0] < 2:
        raise ValueError(f"a contrastive loss needs a batch of at least 2 pairs, got {features_a.shape[0]}")
    dtype = working_dtype(features_a.dtype)
    a, b = features_a.to(dtype), features_b.to(dtype)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a, b


def resolve_scale(logit_scale: Tensor | float | None, temperature: float, like: Tensor) -> Tensor:
    """The multiplier of the cosine similarities: ``logit_scale`` if given, else 1/temperature.

    ``logit_scale`` follows open_clip: it is the scale itself (already exponentiated), a python
    float or a scalar tensor (a learnable one keeps its gradient).
    """
    if logit_scale is None:
        return torch.tensor(1.0 / temperature, dtype=like.dtype, device=like.device)
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(()).to(like.dtype)
    return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)


def check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def check_mode(mode: str) -> str:
    if mode not in ("bimodal", "unimodal"):
        raise ValueError(f"mode must be 'bimodal' or 'unimodal', got {mode!r}")
    return mode


def check_index(index: Tensor, batch_size: int, dataset_size: int, device: torch.device) -> Tensor:
    """Dataset indices of the batch rows: an integer tensor of shape (B,) inside [0, N)."""
    index = integer_vector(index, "index", batch_size, device, " to match the features")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= dataset_size:
        bad = low if low < 0 else high
        raise ValueError(f"index {bad} is out of range for dataset_size={dataset_size} (valid: 0..{dataset_size - 1})")
    return index
