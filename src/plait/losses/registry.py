"""Build any plait loss from its name and options, so configs can name one."""

from __future__ import annotations

from torch import nn

from plait.losses.gamma import GammaContrastiveLoss
from plait.losses.infonce import InfoNCELoss
from plait.losses.sogclr import SogCLRLoss
from plait.registry import Registry

LOSSES = Registry("loss")
LOSSES.register("infonce", InfoNCELoss, aliases=("clip",))
LOSSES.alias("ntxent", "infonce", defaults={"mode": "unimodal"})
LOSSES.register("gamma", GammaContrastiveLoss, aliases=("decomposable",))
LOSSES.register("sogclr", SogCLRLoss)
ALIASES = LOSSES.aliases  # read-only view: alias -> canonical name


def build_loss(name: str, fill: dict | None = None, **options) -> nn.Module:
    """``build_loss("gamma", dataset_size=1000, estimator="memory")`` -> GammaContrastiveLoss.

    Names: infonce (aliases clip; ntxent, which defaults to mode="unimodal"), gamma
    (decomposable), sogclr. ``fill`` holds values passed only to a loss that takes them
    (``fill={"dataset_size": n, "seed": s}``; given options win). Unknown names or options raise
    a ValueError that lists the valid ones.
    """
    return LOSSES.build(name, fill=fill, **options)
