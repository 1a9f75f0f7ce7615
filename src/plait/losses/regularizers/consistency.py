"""Geometric consistency (Jiang et al., CVPR 2023, section 4.3; DESIGN.md section 2 (3))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from plait.losses._inputs import working_dtype
from plait.losses.regularizers.base import Regularizer


class GeometricConsistency(Regularizer):
    """L_GC + L^a_GC on raw cosines (no temperature), a generalisation of CyCLIP.

    With z_V = ``a``, z_T = ``b``, z^a_V = ``a_aug``, z^a_T = ``b_aug`` (B, d), L2-normalised inside, N = B::

        L_GC   = 1/N sum_j sum_k [ (<z_Vj, z_Tk> - <z_Vk, z_Tj>)^2 + (<z_Vj, z_Vk> - <z_Tj, z_Tk>)^2 ]
        L^a_GC = 1/N sum_j sum_k [ (<z_Vj, z_Vk> - <z^a_Vj, z^a_Vk>)^2 + (<z_Tj, z_Tk> - <z^a_Tj, z^a_Tk>)^2 ]
                 + 1/N sum_j (<z_Vj, z_Tj> - <z^a_Vj, z^a_Tj>)^2

    Returns the scalar L_GC + L^a_GC; ``parts`` holds both.
    """

    needs = ("a", "b", "a_aug", "b_aug")

    def forward(self, a: Tensor, b: Tensor, a_aug: Tensor, b_aug: Tensor) -> Tensor:
        a, b, a_aug, b_aug = (F.normalize(x.to(working_dtype(x.dtype)), dim=-1) for x in (a, b, a_aug, b_aug))
        n = a.shape[0]
        cross = a @ b.T
        gram_a, gram_b = a @ a.T, b @ b.T
        gram_a_aug, gram_b_aug = a_aug @ a_aug.T, b_aug @ b_aug.T
        gc = (((cross - cross.T) ** 2).sum() + ((gram_a - gram_b) ** 2).sum()) / n
        gc_aug = (((gram_a - gram_a_aug) ** 2).sum() + ((gram_b - gram_b_aug) ** 2).sum()) / n
        gc_aug = gc_aug + (((a * b).sum(-1) - (a_aug * b_aug).sum(-1)) ** 2).mean()
        self.parts = {"gc": gc.detach(), "gc_augmented": gc_aug.detach()}
        return gc + gc_aug
