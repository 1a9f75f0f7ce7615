"""Geometric consistency (Jiang et al., CVPR 2023, section 4.3; DESIGN.md section 2 (3))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from plait.losses._inputs import working_dtype


class GeometricConsistency(nn.Module):
    """L_GC + L^a_GC on raw cosines (no temperature), a generalisation of CyCLIP.

    With z_V, z_T, z^a_V, z^a_T (B, d) L2-normalised inside and N = B::

        L_GC   = 1/N sum_j sum_k [ (<z_Vj, z_Tk> - <z_Vk, z_Tj>)^2 + (<z_Vj, z_Vk> - <z_Tj, z_Tk>)^2 ]
        L^a_GC = 1/N sum_j sum_k [ (<z_Vj, z_Vk> - <z^a_Vj, z^a_Vk>)^2 + (<z_Tj, z_Tk> - <z^a_Tj, z^a_Tk>)^2 ]
                 + 1/N sum_j (<z_Vj, z_Tj> - <z^a_Vj, z^a_Tj>)^2

    Returns the scalar L_GC + L^a_GC; ``parts`` holds both.
    """

    def __init__(self):
        super().__init__()
        self.parts: dict = {}

    def forward(self, z_v: Tensor, z_t: Tensor, z_v_aug: Tensor, z_t_aug: Tensor) -> Tensor:
        z_v, z_t, z_v_aug, z_t_aug = (F.normalize(x.to(working_dtype(x.dtype)), dim=-1) for x in (z_v, z_t, z_v_aug, z_t_aug))
        n = z_v.shape[0]
        cross = z_v @ z_t.T
        image, text = z_v @ z_v.T, z_t @ z_t.T
        image_aug, text_aug = z_v_aug @ z_v_aug.T, z_t_aug @ z_t_aug.T
        gc = (((cross - cross.T) ** 2).sum() + ((image - text) ** 2).sum()) / n
        gc_aug = (((image - image_aug) ** 2).sum() + ((text - text_aug) ** 2).sum()) / n
        gc_aug = gc_aug + (((z_v * z_t).sum(-1) - (z_v_aug * z_t_aug).sum(-1)) ** 2).mean()
        self.parts = {"gc": gc.detach(), "gc_augmented": gc_aug.detach()}
        return gc + gc_aug
