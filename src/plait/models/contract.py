"""The one contract between the trainer and every model (two-tower and fusion alike).

The trainer knows a model only through this contract (docs/models.md has the data flow):

- ``training_step(batch, objective) -> StepOutput``: the scalar loss of one batch and its named
  terms. The model computes whatever its framework needs (a two-tower model: two feature sets
  for ``objective``; a fusion model: ITC features for ``objective`` plus ITM and MLM inside).
- ``contrastive_features(batch) -> PairFeatures``: the features the contrastive ``objective``
  consumes (also used to name the items of a batch that made a loss non-finite).
- ``encode_a(x, features=...)`` / ``encode_b(x, ...)`` -> (B, d) L2-normalised, and
  ``scale()``: what evaluation, the loss's memory-bank refresh and its staleness statistic read.
- ``after_optimizer_step()``: called after every optimizer step that was taken (momentum
  encoders, queues); a no-op by default.

Everything a model must carry across a resume (momentum encoders, queues and their pointers)
lives in its ``state_dict()``: the trainer checkpoints only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One training batch on the device.

    ``index`` (B,) dataset indices; ``a``, ``b`` the training views (tensors (B, ...) or lists of
    strings); ``a_aug``, ``b_aug`` second augmented views when the objective asks for them
    (``objective.needs_augmented``); ``bank`` the (z_a, z_b) of a momentum copy of the model for
    the loss's memory bank (``train.bank_momentum``); ``extra`` anything a task adds (labels)."""

    index: Tensor
    a: Any
    b: Any
    a_aug: Any = None
    b_aug: Any = None
    bank: tuple[Tensor, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """``loss``: the scalar to back-propagate; ``terms``: named detached parts for the logs;
    ``features``: the contrastive features of the step (to name the items behind a bad loss)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    features: Any = None


class ObjectiveError(ValueError):
    """The objective refused a batch (e.g. a feature row with no direction); ``features`` are the
    features it was given, so the trainer can name the items at fault."""

    def __init__(self, message: str, features):
        super().__init__(message)
        self.features = features


def apply_objective(objective: nn.Module, features):
    """``objective(features)`` in float32 even inside an autocast region (loss internals stay
    float32); a ValueError it raises becomes an :class:`ObjectiveError` carrying the features.

    Under torchrun the features are first gathered from every rank with their dataset indices
    (``plait.distributed.gather_features``): every model's objective sees the global batch."""
    from plait.distributed import gather_features

    features = gather_features(features)
    with torch.autocast(device_type=features.a.device.type, enabled=False):
        try:
            return objective(features)
        except ValueError as error:
            raise ObjectiveError(str(error), features) from error


class ContrastiveModel(nn.Module):
    """Base of plait's models: the default ``training_step`` is ``objective`` applied to
    ``contrastive_features``; a model with losses of its own (fusion) extends it."""

    def contrastive_features(self, batch: Batch):  # pragma: no cover - every model defines it
        raise NotImplementedError

    def training_step(self, batch: Batch, objective: nn.Module) -> StepOutput:
        features = self.contrastive_features(batch)
        loss = apply_objective(objective, features)
        return StepOutput(loss, dict(getattr(objective, "stats", {})), features)

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step taken; nothing to do for a plain model."""
