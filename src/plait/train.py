"""Deprecated: the trainer lives in :mod:`plait.training` (``from plait.training import Trainer, train``)
and ``build_objective`` in :mod:`plait.losses.objective`. This module re-exports them for one
release, with a DeprecationWarning."""

import warnings

from plait.losses.objective import build_objective
from plait.training import MAX_CONSECUTIVE_SKIPS, Trainer, train

warnings.warn("plait.train is deprecated: import Trainer and train from plait.training", DeprecationWarning, stacklevel=2)

__all__ = ["MAX_CONSECUTIVE_SKIPS", "Trainer", "build_objective", "train"]
