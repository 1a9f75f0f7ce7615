"""CLIP-style two-tower model: any two encoders, projection heads, a learnable logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOGIT_SCALE = math.log(100.0)


class ProjectionHead(nn.Module):
    """Linear (``hidden=0``) or Linear-GELU-Linear projection: (B, in_dim) -> (B, embed_dim)."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            self.net = nn.Linear(in_dim, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TwoTower(nn.Module):
    """z_a = normalize(P_a(f_a(x_a))), z_b = normalize(P_b(f_b(x_b))); scale = exp(t), t <= ln 100.

    ``encoder_a`` and ``encoder_b`` are any modules mapping a batch to (B, out_dim) features (set
    ``out_dim`` on them or pass ``dims``). ``forward(a, b)`` returns (z_a, z_b, logit_scale),
    the convention of open_clip's ``ClipLoss`` inputs.
    """

    def __init__(self, encoder_a: nn.Module, encoder_b: nn.Module, embed_dim: int = 128,
                 init_temperature: float = 0.07, learn_temperature: bool = True, projection_hidden: int = 0,
                 dims: tuple[int, int] | None = None):
        super().__init__()
        if not 0 < init_temperature:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        dim_a, dim_b = dims if dims is not None else (encoder_a.out_dim, encoder_b.out_dim)
        self.encoder_a, self.encoder_b = encoder_a, encoder_b
        self.project_a = ProjectionHead(dim_a, embed_dim, projection_hidden)
        self.project_b = ProjectionHead(dim_b, embed_dim, projection_hidden)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.embed_dim = embed_dim

    def scale(self) -> Tensor:
        """exp of the learnable log-scale, clamped at 100 (CLIP)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_a(self, a) -> Tensor:
        return F.normalize(self.project_a(self.encoder_a(a)), dim=-1)

    def encode_b(self, b) -> Tensor:
        return F.normalize(self.project_b(self.encoder_b(b)), dim=-1)

    def forward(self, a, b) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_a(a), self.encode_b(b), self.scale()
