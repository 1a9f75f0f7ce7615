"""A base contrastive loss (optionally with in-modal terms) plus weighted structure regularisers.

    L = base(z_V, z_T) + sum_k w_k R_k                                   (in_modal=False)
    L = 1/2 base(z_V, z_T) + 1/4 base_V(z_V, z^a_V) + 1/4 base_T(z_T, z^a_T) + sum_k w_k R_k

The second line is DESIGN.md's L_Con = 1/4 (V2T + T2V + V2V + T2T) for symmetric bases; the
in-modal terms contrast each item with its augmented view and, for stateful bases (the gamma
loss, SogCLR), keep their own per-sample state. Any base loss composes with any regulariser.
Without a base (``base=None``, config ``loss.name: momentum_itc``) the objective is the
regularisers alone: the model adds its own contrastive term (the fusion model's ITC).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from plait.losses.regularizers import (DEFAULT_WEIGHTS, REGULARIZER_ALIASES, REGULARIZERS, BrownianBridge,
                                      FeatureSeparation, GeometricConsistency)


@dataclass
class PairFeatures:
    """One batch's features; augmented (``*_aug``) and independent (``*_ind``) ones only when a
    term needs them. All (B, d), L2-normalised."""

    a: Tensor
    b: Tensor
    index: Tensor | None = None
    logit_scale: Tensor | None = None
    a_aug: Tensor | None = None
    b_aug: Tensor | None = None
    a_ind: Tensor | None = None
    b_ind: Tensor | None = None
    a_ind_aug: Tensor | None = None
    b_ind_aug: Tensor | None = None
    a_bank: Tensor | None = None  # the same views through a momentum encoder, for a memory bank
    b_bank: Tensor | None = None
    gathered: bool = False  # already the global batch of every rank (``plait.distributed.gather_features``)


class ContrastiveObjective(nn.Module):
    def __init__(self, base: nn.Module, in_modal: tuple[nn.Module, nn.Module] | None = None,
                 regularizers: list[tuple[str, float, nn.Module]] | tuple = ()):
        super().__init__()
        if base is None and in_modal:
            raise ValueError("the in-modal terms need a base loss (loss.in_modal with loss.name=momentum_itc is not defined)")
        self.base = base  # None: the model's own contrastive term (the fusion model's momentum ITC)
        self.in_modal = nn.ModuleList(in_modal) if in_modal else None
        self.names = [name for name, _, _ in regularizers]
        self.weights = [float(weight) for _, weight, _ in regularizers]
        self.regularizers = nn.ModuleList([module for _, _, module in regularizers])
        self.parts: dict[str, Tensor] = {}

    @property
    def needs_augmented(self) -> bool:
        return self.in_modal is not None or len(self.regularizers) > 0

    @property
    def needs_independent(self) -> bool:
        return any(isinstance(m, FeatureSeparation) for m in self.regularizers)

    @property
    def stats(self) -> dict:
        """The base loss's staleness statistics and every term of the last call."""
        return {**(getattr(self.base, "stats", {}) if self.base is not None else {}), **self.parts}

    def forward(self, f: PairFeatures) -> Tensor:
        if self.base is None:  # the model computes its own contrastive term: only the regularisers here
            total, parts = f.a.new_zeros(()), {}
        else:
            extra = {} if f.a_bank is None else {"bank_features": (f.a_bank, f.b_bank)}
            cross = self.base(f.a, f.b, index=f.index, logit_scale=f.logit_scale, **extra)
            parts = {"base": cross.detach()}
            total = cross
        if self.in_modal is not None:
            _require(f, "a_aug", "b_aug", why="the in-modal terms")
            image = self.in_modal[0](f.a, f.a_aug, index=f.index, logit_scale=f.logit_scale)
            text = self.in_modal[1](f.b, f.b_aug, index=f.index, logit_scale=f.logit_scale)
            total = cross / 2 + (image + text) / 4
            parts.update(in_modal_a=image.detach(), in_modal_b=text.detach())
        for name, weight, module in zip(self.names, self.weights, self.regularizers):
            if isinstance(module, FeatureSeparation):
                _require(f, "a_ind", "b_ind", "a_ind_aug", "b_ind_aug", why=name)
                value = module(f.a, f.b, f.a_ind, f.b_ind, f.a_ind_aug, f.b_ind_aug)
            elif isinstance(module, BrownianBridge):
                _require(f, "a_aug", why=name)
                value = module(f.a, f.b, f.a_aug)
            elif isinstance(module, GeometricConsistency):
                _require(f, "a_aug", "b_aug", why=name)
                value = module(f.a, f.b, f.a_aug, f.b_aug)
            else:
                value = module(f)
            parts[name] = value.detach()
            total = total + weight * value
        self.parts = parts
        return total


def _require(features: PairFeatures, *fields: str, why: str) -> None:
    missing = [field for field in fields if getattr(features, field) is None]
    if missing:
        raise ValueError(f"{why} needs the features {', '.join(missing)}, which were not computed")


def build_regularizer(spec: dict, seed: int = 0) -> tuple[str, float, nn.Module]:
    """(name, weight, module) from ``{"name": "bridge", "weight": 0.1, **options}``; without a
    weight, the measured default of ``DEFAULT_WEIGHTS``."""
    spec = dict(spec)
    name = REGULARIZERS.resolve(str(spec.pop("name", "")))
    weight = spec.pop("weight", DEFAULT_WEIGHTS[name])
    if not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"regularizer {name!r}: weight must be a non-negative number, got {weight!r}")
    return name, float(weight), REGULARIZERS.build(name, fill={"seed": seed}, **spec)
