"""CLIP-style two-tower model: any two encoders, projection heads, a learnable logit scale."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plait._checks import check_int, is_number
from plait.models.contract import Batch, ContrastiveModel
from plait.models.encoder import ENCODERS, MAX_SIZE, build_encoder
from plait.models.inputs import meta_samples
from plait.types import PairFeatures

DEFAULT_ENCODERS = {"image": {"name": "cnn"}, "text": {"name": "bow"}, "vector": {"name": "mlp"}}

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

    @classmethod
    def from_config(cls, config: dict, inputs, *, independent: bool = False, allow_import: bool = False,
                    device=None, seed: int = 0) -> TwoTower:
        """``model.kind: two_tower`` (the default): encoders from ``model.a`` / ``model.b`` (an empty
        spec picks the modality's default: cnn for images, bow for text, mlp for vectors), sized
        from ``inputs`` (a dataset or an input spec). Sizes are checked first (a ValueError naming
        the key); ``device="meta"`` builds shapes only, except encoders that load weights from disk.
        ``seed`` is unused: its draws are the global generator's."""
        modalities, samples = meta_samples(inputs)
        embed_dim = config.get("embed_dim", 128)  # checked by plait.models.build_model
        projection_hidden = config.get("projection_hidden", 0)
        check_int("model.projection_hidden", projection_hidden, minimum=0, maximum=MAX_SIZE)
        temperature = config.get("init_temperature", 0.07)
        if not (is_number(temperature) and math.isfinite(temperature) and 0 < temperature):
            raise ValueError(f"model.init_temperature={temperature!r} is not valid: it must be a positive number")
        specs = []
        for side, modality in zip("ab", modalities):
            spec = config.get(side) or DEFAULT_ENCODERS[modality]
            if not isinstance(spec, dict):
                raise ValueError(f"model.{side}: expected an encoder spec {{name: ..., ...}}, got {str(spec)[:60]!r}")
            specs.append(spec)

        def encoder(side: str, spec: dict, sample) -> nn.Module:
            name = spec.get("name")
            from_disk = name in ENCODERS and ENCODERS.get(name).loads_weights  # built for real: weights from disk
            meta = device is not None and str(device) == "meta" and not from_disk
            with torch.device("meta") if meta else contextlib.nullcontext():
                return build_encoder(spec, sample, allow_import, key=f"model.{side}")

        encoder_a = encoder("a", specs[0], samples[0])
        encoder_b = encoder("b", specs[1], samples[1])
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(encoder_a, encoder_b, embed_dim=embed_dim, init_temperature=temperature,
                       learn_temperature=config.get("learn_temperature", True), projection_hidden=projection_hidden,
                       independent=independent)

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
        bank = ({} if batch.bank is None
                else {"a_bank": _at_least_float32(batch.bank[0]), "b_bank": _at_least_float32(batch.bank[1])})
        if batch.a_aug is None:
            za, zb, scale = self(batch.a, batch.b)
            return PairFeatures(_at_least_float32(za), _at_least_float32(zb), batch.index, _at_least_float32(scale), **bank)
        size = len(batch.index)
        za, zia = self.embed_a(_join(batch.a, batch.a_aug))
        zb, zib = self.embed_b(_join(batch.b, batch.b_aug))

        def halves(z):
            return (None, None) if z is None else (_at_least_float32(z[:size]), _at_least_float32(z[size:]))

        (za, za_aug), (zb, zb_aug), (zia, zia_aug), (zib, zib_aug) = halves(za), halves(zb), halves(zia), halves(zib)
        return PairFeatures(za, zb, batch.index, _at_least_float32(self.scale()), za_aug, zb_aug, zia, zib, zia_aug, zib_aug,
                            **bank)


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
