"""CLIP-style two-tower model: any two encoders, projection heads, a learnable logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plait.models.contract import Batch, ContrastiveModel

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


class TwoTower(ContrastiveModel):
    """z_a = normalize(P_a(f_a(x_a))), z_b = normalize(P_b(f_b(x_b))); scale = exp(t), t <= ln 100.

    ``encoder_a`` and ``encoder_b`` are any modules mapping a batch to (B, out_dim) features (set
    ``out_dim`` on them or pass ``dims``). ``forward(a, b)`` returns (z_a, z_b, logit_scale),
    the convention of open_clip's ``ClipLoss`` inputs. ``independent=True`` adds a second
    projection head per tower for modality-specific features z^i (feature separation), read
    with ``embed_a`` / ``embed_b`` or ``encode_a(x, features="independent" | "both")``.
    Trains through the model contract (``plait.models.contract``): ``training_step`` is the
    objective on ``contrastive_features``.
    """

    def __init__(self, encoder_a: nn.Module, encoder_b: nn.Module, embed_dim: int = 128,
                 init_temperature: float = 0.07, learn_temperature: bool = True, projection_hidden: int = 0,
                 dims: tuple[int, int] | None = None, independent: bool = False):
        super().__init__()
        if not 0 < init_temperature:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        dim_a, dim_b = dims if dims is not None else (encoder_a.out_dim, encoder_b.out_dim)
        self.encoder_a, self.encoder_b = encoder_a, encoder_b
        self.project_a = ProjectionHead(dim_a, embed_dim, projection_hidden)
        self.project_b = ProjectionHead(dim_b, embed_dim, projection_hidden)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.embed_dim = embed_dim
        self.independent_a = ProjectionHead(dim_a, embed_dim, projection_hidden) if independent else None
        self.independent_b = ProjectionHead(dim_b, embed_dim, projection_hidden) if independent else None

    def scale(self) -> Tensor:
        """exp of the learnable log-scale, clamped at 100 (CLIP)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def embed_a(self, a) -> tuple[Tensor, Tensor | None]:
        """(shared z_a, independent z^i_a or None), one encoder pass."""
        return _embed(self.encoder_a(a), self.project_a, self.independent_a)

    def embed_b(self, b) -> tuple[Tensor, Tensor | None]:
        return _embed(self.encoder_b(b), self.project_b, self.independent_b)

    def encode_a(self, a, features: str = "shared") -> Tensor:
        return select_features(*self.embed_a(a), features)

    def encode_b(self, b, features: str = "shared") -> Tensor:
        return select_features(*self.embed_b(b), features)

    def forward(self, a, b) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_a(a), self.encode_b(b), self.scale()

    def contrastive_features(self, batch: Batch):
        """The objective's input (float32): each tower runs once, over [view; augmented view]
        when the batch has augmented views; independent features when the model has their heads."""
        from plait.losses.objective import PairFeatures

        bank = {} if batch.bank is None else {"a_bank": _at_least_float32(batch.bank[0]), "b_bank": _at_least_float32(batch.bank[1])}
        if batch.a_aug is None:
            za, zb, scale = self(batch.a, batch.b)
            return PairFeatures(_at_least_float32(za), _at_least_float32(zb), batch.index, _at_least_float32(scale), **bank)
        size = len(batch.index)
        za, zia = self.embed_a(_join(batch.a, batch.a_aug))
        zb, zib = self.embed_b(_join(batch.b, batch.b_aug))

        def halves(z):
            return (None, None) if z is None else (_at_least_float32(z[:size]), _at_least_float32(z[size:]))

        (za, za_aug), (zb, zb_aug), (zia, zia_aug), (zib, zib_aug) = halves(za), halves(zb), halves(zia), halves(zib)
        return PairFeatures(za, zb, batch.index, _at_least_float32(self.scale()), za_aug, zb_aug, zia, zib, zia_aug, zib_aug, **bank)


def _at_least_float32(z: Tensor) -> Tensor:
    """The loss's input dtype: float32 (from bf16/fp16 autocast outputs), float64 kept (``train.precision=fp64``)."""
    return z if z.dtype == torch.float64 else z.float()


def _join(x, y):
    """A batch of views followed by another: tensors concatenated, lists of strings joined."""
    return torch.cat([x, y]) if torch.is_tensor(x) else [*x, *y]


def _embed(hidden: Tensor, shared: nn.Module, independent: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    z = F.normalize(shared(hidden), dim=-1)
    return z, (F.normalize(independent(hidden), dim=-1) if independent is not None else None)


def select_features(shared: Tensor, independent: Tensor | None, features: str) -> Tensor:
    """``shared``, ``independent`` or ``both`` ([z, z^i] concatenated): what evaluation reads of a
    model with (optionally) modality-specific heads; shared by the two-tower and the fusion model."""
    if features == "shared":
        return shared
    if features not in ("independent", "both"):
        raise ValueError(f"features must be 'shared', 'independent' or 'both', got {features!r}")
    if independent is None:
        raise ValueError(f"features={features!r} needs a model with independent heads (a separation regularizer)")
    return independent if features == "independent" else torch.cat([shared, independent], dim=-1)
