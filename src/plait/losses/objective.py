"""A base contrastive loss (optionally with in-modal terms) plus weighted structure regularisers.

    L = base(z_a, z_b) + sum_k w_k R_k                                   (in_modal=False)
    L = 1/2 base(z_a, z_b) + 1/4 base_a(z_a, z^aug_a) + 1/4 base_b(z_b, z^aug_b) + sum_k w_k R_k

(a = V, the image, and b = T, the text, in image-text data.) The second line is DESIGN.md's
L_Con = 1/4 (V2T + T2V + V2V + T2T) for symmetric bases; the in-modal terms contrast each item
with its augmented view and, for stateful bases (the gamma loss, SogCLR), keep their own
per-sample state. Any base loss composes with any regulariser. Without a base (``base=None``,
config ``loss.name: momentum_itc``) the objective is the regularisers alone: the model adds its
own contrastive term (the fusion model's ITC).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from plait.losses.regularizers import DEFAULT_WEIGHTS, REGULARIZERS
from plait.types import PairFeatures

MODEL_ITC = "momentum_itc"  # loss.name of a model's own contrastive term (the fusion model's momentum ITC)

__all__ = ["MODEL_ITC", "ContrastiveObjective", "PairFeatures", "build_base_loss", "build_objective", "build_regularizer",
           "reads_independent"]


class ContrastiveObjective(nn.Module):
    """``objective(features: PairFeatures) -> scalar``: the base loss, the in-modal terms and the
    weighted regularisers of one batch; ``stats`` holds the base loss's statistics and every
    term of the last call (detached), for the logs.

    Example::

        objective = ContrastiveObjective(InfoNCELoss(), regularizers=[("bridge", 0.1, BrownianBridge())])
        loss = objective(PairFeatures(a, b, index, scale, a_aug=a2, b_aug=b2))
    """

    def __init__(self, base: nn.Module | None, in_modal: tuple[nn.Module, nn.Module] | None = None,
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
        """Whether a batch must carry second augmented views (in-modal terms, any regulariser)."""
        return self.in_modal is not None or len(self.regularizers) > 0

    @property
    def needs_independent(self) -> bool:
        """Whether the model must give independent features (a regulariser reads ``a_ind``)."""
        return reads_independent([type(module) for module in self.regularizers])

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
            _require(f, ("a_aug", "b_aug"), why="the in-modal terms")
            in_a = self.in_modal[0](f.a, f.a_aug, index=f.index, logit_scale=f.logit_scale)
            in_b = self.in_modal[1](f.b, f.b_aug, index=f.index, logit_scale=f.logit_scale)
            total = cross / 2 + (in_a + in_b) / 4
            parts.update(in_modal_a=in_a.detach(), in_modal_b=in_b.detach())
        for name, weight, module in zip(self.names, self.weights, self.regularizers):
            needs = _needs(module)
            if needs is None:  # a module of the caller's own: it reads the whole features
                value = module(f)
            else:
                _require(f, needs, why=name)
                value = module(*(getattr(f, field) for field in needs))
            parts[name] = value.detach()
            total = total + weight * value
        self.parts = parts
        return total


def reads_independent(regularizer_types: list[type]) -> bool:
    """Whether some regulariser class declares it reads independent features (``a_ind``): the
    model then builds independent heads. Config validation asks before anything is built."""
    from plait.losses.regularizers import Regularizer

    return any(issubclass(kind, Regularizer) and "a_ind" in kind.needs for kind in regularizer_types)


def _needs(module: nn.Module) -> tuple[str, ...] | None:
    """The features a regulariser declares it reads (``Regularizer.needs``); None for any other module."""
    from plait.losses.regularizers import Regularizer

    return module.needs if isinstance(module, Regularizer) else None


def _require(features: PairFeatures, fields: tuple[str, ...], why: str) -> None:
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


def build_base_loss(config: DictConfig, dataset_size: int, seed: int) -> nn.Module:
    """The config's ``loss`` (name and options), with ``dataset_size`` and ``seed`` filled in where it takes them."""
    from plait.losses.registry import build_loss

    options = OmegaConf.to_container(config.loss.options, resolve=True) or {}
    return build_loss(config.loss.name, fill={"dataset_size": dataset_size, "seed": seed}, **options)


def build_objective(config: DictConfig, dataset_size: int) -> ContrastiveObjective:
    """A run's objective: the base loss (+ in-modal terms with their own state, seeds ``seed + 1``
    and ``seed + 2``) and the config's regularisers. ``loss.name: momentum_itc`` has no base: the
    model computes its own contrastive term (validated in ``plait.config.validate``)."""
    regularizers = [build_regularizer(OmegaConf.to_container(spec, resolve=True), seed=config.seed)
                    for spec in config.regularizers]
    if config.loss.name == MODEL_ITC:
        return ContrastiveObjective(None, None, regularizers)
    base = build_base_loss(config, dataset_size, config.seed)
    in_modal = None
    if config.loss.in_modal:
        in_modal = (build_base_loss(config, dataset_size, config.seed + 1),
                    build_base_loss(config, dataset_size, config.seed + 2))
    return ContrastiveObjective(base, in_modal, regularizers)
