"""Latent modality structure regularisers (Jiang et al., CVPR 2023)."""

from plait.losses.regularizers.bridge import BrownianBridge
from plait.losses.regularizers.consistency import GeometricConsistency
from plait.losses.regularizers.separation import FeatureSeparation

REGULARIZERS = {"separation": FeatureSeparation, "bridge": BrownianBridge, "consistency": GeometricConsistency}
REGULARIZER_ALIASES = {"sep": "separation", "br": "bridge", "gc": "consistency"}

__all__ = ["BrownianBridge", "FeatureSeparation", "GeometricConsistency", "REGULARIZERS", "REGULARIZER_ALIASES"]
