"""Deep feature separation (Jiang et al., CVPR 2023, section 4.1; DESIGN.md section 2 (1))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from plait.losses._inputs import working_dtype
from plait.losses.infonce import InfoNCELoss
from plait.losses.regularizers.base import Regularizer


class FeatureSeparation(Regularizer):
    """L_Sep = L_Ortho + L^i_Con + L^i_Uni on independent features z^i beside the shared z.

    With z_V = ``a``, z_T = ``b`` (B, d) the shared features, z^i_V = ``a_ind``, z^i_T = ``b_ind``
    (B, d') the independent ones and z^i_Va = ``a_ind_aug``, z^i_Ta = ``b_ind_aug`` those of the
    augmented views (all L2-normalised inside)::

        L_Ortho  = 1/N sum_j ( <z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2 )            (needs d == d')
        L^i_Con  = 1/2 [ InfoNCE(z^i_V, z^i_Va) + InfoNCE(z^i_T, z^i_Ta) ]       (positive: the augmented view)
        L^i_Uni  = log 1/N sum_j sum_k [ exp(-t ||z^i_Vj - z^i_Vk||^2) + exp(-t ||z^i_Tj - z^i_Tk||^2) ]

    (the paper prints L^i_Con with the feature against itself, which is degenerate; DESIGN.md
    fixes the positive to the augmented view). ``temperature`` is L^i_Con's, ``t`` the
    uniformity's (2, as Wang & Isola). Returns a scalar; ``parts`` holds the three terms.
    """

    needs = ("a", "b", "a_ind", "b_ind", "a_ind_aug", "b_ind_aug")

    def __init__(self, temperature: float = 0.1, t: float = 2.0):
        super().__init__()
        if not t > 0:
            raise ValueError(f"t must be positive, got {t}")
        self.t = float(t)
        self.contrast = InfoNCELoss(temperature=temperature)

    def forward(self, a: Tensor, b: Tensor, a_ind: Tensor, b_ind: Tensor, a_ind_aug: Tensor, b_ind_aug: Tensor) -> Tensor:
        a, b, a_ind, b_ind = (F.normalize(x.to(working_dtype(x.dtype)), dim=-1) for x in (a, b, a_ind, b_ind))
        if a.shape != a_ind.shape or b.shape != b_ind.shape:
            raise ValueError(
                f"L_Ortho needs shared and independent features of one shape, got {tuple(a.shape)} and {tuple(a_ind.shape)}"
            )
        ortho = ((a * a_ind).sum(-1) ** 2 + (b * b_ind).sum(-1) ** 2).mean()
        con = (self.contrast(a_ind, a_ind_aug) + self.contrast(b_ind, b_ind_aug)) / 2
        uni = torch.logsumexp(torch.stack([-self.t * _squared_distances(a_ind),
                                           -self.t * _squared_distances(b_ind)]).flatten(), 0)
        uni = uni - math.log(a_ind.shape[0])
        self.parts = {"ortho": ortho.detach(), "independent_contrast": con.detach(), "uniformity": uni.detach()}
        return ortho + con + uni


def _squared_distances(x: Tensor) -> Tensor:
    """(B, B) ||x_j - x_k||^2 for unit rows, as 2 - 2 <x_j, x_k> (clamped at 0)."""
    return (2 - 2 * x @ x.T).clamp(min=0)
