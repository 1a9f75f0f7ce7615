"""Deep feature separation (Jiang et al., CVPR 2023, section 4.1; DESIGN.md section 2 (1))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plait.losses._inputs import working_dtype

from plait.losses.infonce import InfoNCELoss


class FeatureSeparation(nn.Module):
    """L_Sep = L_Ortho + L^i_Con + L^i_Uni on independent features z^i beside the shared z.

    With z_V, z_T (B, d) the shared features, z^i_V, z^i_T (B, d') the independent ones and
    z^i_Va, z^i_Ta those of the augmented views (all L2-normalised inside)::

        L_Ortho  = 1/N sum_j ( <z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2 )            (needs d == d')
        L^i_Con  = 1/2 [ InfoNCE(z^i_V, z^i_Va) + InfoNCE(z^i_T, z^i_Ta) ]       (positive: the augmented view)
        L^i_Uni  = log 1/N sum_j sum_k [ exp(-t ||z^i_Vj - z^i_Vk||^2) + exp(-t ||z^i_Tj - z^i_Tk||^2) ]

    (the paper prints L^i_Con with the feature against itself, which is degenerate; DESIGN.md
    fixes the positive to the augmented view). ``temperature`` is L^i_Con's, ``t`` the
    uniformity's (2, as Wang & Isola). Returns a scalar; ``parts`` holds the three terms.
    """

    def __init__(self, temperature: float = 0.1, t: float = 2.0):
        super().__init__()
        if not t > 0:
            raise ValueError(f"t must be positive, got {t}")
        self.t = float(t)
        self.contrast = InfoNCELoss(temperature=temperature)
        self.parts: dict[str, Tensor] = {}

    def forward(self, z_v: Tensor, z_t: Tensor, zi_v: Tensor, zi_t: Tensor, zi_v_aug: Tensor, zi_t_aug: Tensor) -> Tensor:
        z_v, z_t, zi_v, zi_t = (F.normalize(x.to(working_dtype(x.dtype)), dim=-1) for x in (z_v, z_t, zi_v, zi_t))
        if z_v.shape != zi_v.shape or z_t.shape != zi_t.shape:
            raise ValueError(
                f"L_Ortho needs shared and independent features of one shape, got {tuple(z_v.shape)} and {tuple(zi_v.shape)}"
            )
        ortho = ((z_v * zi_v).sum(-1) ** 2 + (z_t * zi_t).sum(-1) ** 2).mean()
        con = (self.contrast(zi_v, zi_v_aug) + self.contrast(zi_t, zi_t_aug)) / 2
        uni = torch.logsumexp(torch.stack([-self.t * _squared_distances(zi_v), -self.t * _squared_distances(zi_t)]).flatten(), 0)
        uni = uni - math.log(zi_v.shape[0])
        self.parts = {"ortho": ortho.detach(), "independent_contrast": con.detach(), "uniformity": uni.detach()}
        return ortho + con + uni


def _squared_distances(x: Tensor) -> Tensor:
    """(B, B) ||x_j - x_k||^2 for unit rows, as 2 - 2 <x_j, x_k> (clamped at 0)."""
    return (2 - 2 * x @ x.T).clamp(min=0)
