"""Brownian bridge (Jiang et al., CVPR 2023, section 4.2; DESIGN.md section 2 (2))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plait.losses._inputs import working_dtype
from plait.losses.regularizers.base import Regularizer


class BrownianBridge(Regularizer):
    """The augmented image feature should sit on the bridge from its image to its text.

    With z_V = ``a``, z_T = ``b``, z^a_V = ``a_aug`` (B, d), L2-normalised inside::

        mu_j = (t z_Vj + (1 - t) z_Tj) / || t z_Vj + (1 - t) z_Tj ||
        L_Br = 1/N sum_j || z^a_Vj - mu_j ||^2

    (the first line of the paper's formula; its expanded second line is not equal to it).
    ``t`` is fixed (default 0.25) or, with ``t="uniform"``, drawn per item from U(0, 1) with the
    module's own seeded generator. Returns a scalar.
    """

    needs = ("a", "b", "a_aug")

    def __init__(self, t: float | str = 0.25, seed: int = 0):
        super().__init__()
        if t != "uniform" and not (isinstance(t, (int, float)) and 0 <= t <= 1):
            raise ValueError(f"t must be in [0, 1] or 'uniform', got {t!r}")
        self.t = t
        self._generator = torch.Generator().manual_seed(seed)

    def bridge_mean(self, a: Tensor, b: Tensor) -> Tensor:
        """mu (B, d): the normalised point at t on the way from ``a`` to ``b``."""
        if self.t == "uniform":
            t = torch.rand(a.shape[0], 1, generator=self._generator).to(a.device, a.dtype)
        else:
            t = float(self.t)
        return F.normalize(t * a + (1 - t) * b, dim=-1)

    def forward(self, a: Tensor, b: Tensor, a_aug: Tensor) -> Tensor:
        a, b, a_aug = (F.normalize(x.to(working_dtype(x.dtype)), dim=-1) for x in (a, b, a_aug))
        return ((a_aug - self.bridge_mean(a, b)) ** 2).sum(-1).mean()
