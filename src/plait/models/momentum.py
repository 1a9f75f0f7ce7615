"""The momentum (EMA) update of a slow copy of a module: ALBEF's momentum encoders
(``plait.models.fusion``) and the memory bank's momentum encoder (``train.bank_momentum``)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_momentum(slow: nn.Module, fast: nn.Module, momentum: float) -> None:
    """One exponential-moving-average step of ``slow`` towards ``fast``, in place:

        theta_slow <- m theta_slow + (1 - m) theta_fast      every parameter, m = ``momentum``
        b_slow     <- b_fast                                 every buffer (e.g. BatchNorm statistics)

    ``slow`` is usually ``copy.deepcopy(fast).requires_grad_(False)``; the two are paired in
    ``parameters()`` / ``buffers()`` order and must hold as many of each, parameters of the same
    shapes (ValueError otherwise, before anything is written). m = 0 copies ``fast``; m = 1 keeps
    ``slow``'s parameters (``fast`` finite). Runs without autograd: no gradient of either module
    is read or written. Call it after the optimizer step. Each parameter is updated as
    ``slow.mul_(m).add_(fast, alpha=1 - m)``: these floating-point operations in this order, so
    runs stay bitwise what they were.

    >>> import copy
    >>> fast = nn.Linear(2, 1)
    >>> slow = copy.deepcopy(fast).requires_grad_(False)
    >>> with torch.no_grad():
    ...     _ = fast.weight.add_(1.0)
    >>> update_momentum(slow, fast, momentum=0.9)  # slow.weight = 0.9 w + 0.1 (w + 1) = w + 0.1
    >>> torch.allclose(slow.weight, fast.weight - 0.9)
    True
    """
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    slow_params, fast_params = list(slow.parameters()), list(fast.parameters())
    slow_buffers, fast_buffers = list(slow.buffers()), list(fast.buffers())
    if len(slow_params) != len(fast_params) or len(slow_buffers) != len(fast_buffers):
        raise ValueError(f"update_momentum needs two modules of the same structure: the slow one has "
                         f"{len(slow_params)} parameters and {len(slow_buffers)} buffers, "
                         f"the fast one {len(fast_params)} and {len(fast_buffers)}")
    for p_slow, p_fast in zip(slow_params, fast_params):  # all checked before any is written
        if p_slow.shape != p_fast.shape:  # an in-place add would broadcast a (1,) parameter silently
            raise ValueError(f"update_momentum: a slow parameter of shape {tuple(p_slow.shape)} "
                             f"paired with one of shape {tuple(p_fast.shape)}")
    for p_slow, p_fast in zip(slow_params, fast_params):
        p_slow.mul_(momentum).add_(p_fast.detach(), alpha=1.0 - momentum)
    for b_slow, b_fast in zip(slow_buffers, fast_buffers):
        b_slow.copy_(b_fast)


__all__ = ["update_momentum"]
