"""Latent modality structure regularisers (Jiang et al., CVPR 2023), each a :class:`Regularizer`
that names the features it reads; registered by name for configs (``regularizers: [{name: ...}]``)."""

from plait.losses.regularizers.base import Regularizer
from plait.losses.regularizers.bridge import BrownianBridge
from plait.losses.regularizers.consistency import GeometricConsistency
from plait.losses.regularizers.separation import FeatureSeparation
from plait.registry import Registry

REGULARIZERS = Registry("regularizer")
REGULARIZERS.register("separation", FeatureSeparation, aliases=("sep",))
REGULARIZERS.register("bridge", BrownianBridge, aliases=("br",))
REGULARIZERS.register("consistency", GeometricConsistency, aliases=("gc",))
REGULARIZER_ALIASES = REGULARIZERS.aliases  # read-only view: alias -> canonical name
# Weight of each regulariser when a config gives none; chosen by the UCI weight sweep
# (plait experiment regularizers --sweep-weights; README, "Choosing the weights").
DEFAULT_WEIGHTS = {"separation": 0.1, "bridge": 0.1, "consistency": 1.0}

__all__ = ["BrownianBridge", "DEFAULT_WEIGHTS", "FeatureSeparation", "GeometricConsistency", "REGULARIZERS",
           "REGULARIZER_ALIASES", "Regularizer"]
