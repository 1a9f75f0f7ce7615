"""Argument checks shared across plait's packages: config values, tensors passed to the losses."""

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


def is_int(value) -> bool:
    """Whether ``value`` is a Python integer (``True`` and ``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether ``value`` is an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value, minimum: int | None = None, maximum: int | None = None, *, allow_none: bool = False,
              note: str = "", rule: str | None = None) -> None:
    """Refuse ``value`` unless it is an integer in [minimum, maximum] (or None with ``allow_none``):
    a ValueError ``key=value is not valid: it must be ...`` naming the key, with ``note`` after the
    rule (``" (0: never)"``); ``rule`` words the rule itself (default: from the bounds).

    Example: ``check_int("optim.epochs", 0, minimum=1)`` raises ``optim.epochs=0 is not valid: it
    must be a positive integer``."""
    if value is None and allow_none:
        return
    if is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return
    if rule is not None:
        pass
    elif maximum is not None:
        rule = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        rule = "a positive integer"
    elif minimum is not None:
        rule = f"an integer >= {minimum}"
    else:
        rule = "an integer"
    raise ValueError(f"{key}={value!r} is not valid: it must be {rule}{note}")
