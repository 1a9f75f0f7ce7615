"""Input checks and preparation shared by every loss.

- dtype: the two feature tensors are promoted to ``torch.promote_types`` of their dtypes (float32
  ``a`` with float64 ``b`` computes in float64), then computed in float32 at least (float64 stays
  float64), so that half-precision features and temperatures down to 0.01 stay finite; the
  returned loss has this working dtype.
- normalisation (``normalize=True``): each row x becomes y / ||y|| with y = x / max_k |x_k|. That
  equals x / ||x|| but never squares a tiny or huge norm, so the result is unit-norm, and its
  gradient (through the max as well) the one of x / ||x||, for any positive row scale the dtype
  holds (1e-15 and 1e30 in float32/bfloat16 included; F.normalize alone floors norms at 1e-12 and
  overflows ||x||^2 to inf). An all-zero row has no direction and is refused; non-finite values
  are left as they are (they propagate to the loss; the trainer checks for them).
- batch size: at least ``min_batch`` pairs (2 for the losses that estimate a sum over negatives).
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


def prepare_pair(
    features_a: Tensor, features_b: Tensor, normalize: bool, *, min_batch: int = 2
) -> tuple[Tensor, Tensor]:
    """Check a pair of (B, d) feature tensors with B >= ``min_batch``, promote them to one working
    dtype and, if ``normalize``, scale each row to unit L2 norm (see the module docstring)."""
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
    batch = features_a.shape[0]
    if batch < min_batch:
        reason = " to estimate each anchor's sum over its negatives (a single pair has none)" if min_batch >= 2 else ""
        raise ValueError(f"this loss needs at least {min_batch} pairs{reason}, got a batch of {batch}")
    dtype = working_dtype(torch.promote_types(features_a.dtype, features_b.dtype))
    a, b = features_a.to(dtype), features_b.to(dtype)
    if normalize:
        a, b = _unit_rows(a, "features_a"), _unit_rows(b, "features_b")
    return a, b


def _unit_rows(x: Tensor, name: str) -> Tensor:
    """x / ||x|| per row, computed as y / ||y||, y = x / max|x| (exact for any positive scale)."""
    zero = (x == 0).all(dim=1)
    if zero.any():
        row = int(zero.nonzero()[0, 0])
        raise ValueError(f"{name} row {row} is all zeros; it has no direction to normalise")
    return F.normalize(x / x.abs().amax(dim=1, keepdim=True), dim=1)


def resolve_scale(logit_scale: Tensor | float | None, temperature: float, like: Tensor) -> Tensor:
    """The multiplier of the cosine similarities: ``logit_scale`` if given, else 1/temperature.

    ``logit_scale`` follows open_clip: it is the scale itself (already exponentiated), a python
    number or a floating-point scalar tensor (a learnable one keeps its gradient).
    """
    if logit_scale is None:
        return torch.tensor(1.0 / temperature, dtype=like.dtype, device=like.device)
    if isinstance(logit_scale, Tensor):
        if not logit_scale.is_floating_point():
            raise ValueError(
                f"logit_scale must be a floating-point scalar, got a {logit_scale.dtype} tensor of shape "
                f"{tuple(logit_scale.shape)}; logit_scale is the third positional argument, pass index=... by keyword"
            )
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(()).to(like.dtype)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a number or a scalar tensor, got {type(logit_scale).__name__}")
    return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)


def check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def check_mode(mode: str) -> str:
    if mode not in ("bimodal", "unimodal"):
        raise ValueError(f"mode must be 'bimodal' or 'unimodal', got {mode!r}")
    return mode


def check_index(index: Tensor, batch_size: int, dataset_size: int | None, device: torch.device) -> Tensor:
    """Dataset indices of the batch rows: an integer tensor of shape (B,) inside [0, N), moved to
    ``device`` as int64. ``dataset_size=None`` (no dataset size known) checks only index >= 0."""
    index = integer_vector(index, "index", batch_size, device, " to match the features")
    if index.numel() == 0:
        return index
    low, high = int(index.min()), int(index.max())
    if dataset_size is None:
        if low < 0:
            raise ValueError(f"index {low} is out of range: dataset indices must be >= 0")
    elif low < 0 or high >= dataset_size:
        bad = low if low < 0 else high
        raise ValueError(f"index {bad} is out of range for dataset_size={dataset_size} (valid: 0..{dataset_size - 1})")
    return index
