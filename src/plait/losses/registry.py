"""Build any plait loss from its name and options, so configs can name one."""

from __future__ import annotations

import inspect

from torch import nn

from plait.losses.gamma import GammaContrastiveLoss
from plait.losses.infonce import InfoNCELoss
from plait.losses.sogclr import SogCLRLoss

LOSSES: dict[str, type[nn.Module]] = {
    "infonce": InfoNCELoss,
    "gamma": GammaContrastiveLoss,
    "sogclr": SogCLRLoss,
}
ALIASES = {"clip": "infonce", "ntxent": "infonce", "decomposable": "gamma"}


def build_loss(name: str, **options) -> nn.Module:
    """``build_loss("gamma", dataset_size=1000, estimator="memory")`` -> GammaContrastiveLoss.

    Names: infonce (aliases clip; ntxent, which defaults to mode="unimodal"), gamma
    (decomposable), sogclr. Unknown names or options raise a ValueError that lists the valid ones.
    """
    key = str(name).lower()
    if key == "ntxent":
        options.setdefault("mode", "unimodal")
    key = ALIASES.get(key, key)
    if key not in LOSSES:
        valid = ", ".join(sorted([*LOSSES, *ALIASES]))
        raise ValueError(f"unknown loss {name!r}; valid names: {valid}")
    cls = LOSSES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"loss {key!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}")
    return cls(**options)
