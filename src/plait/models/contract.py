"""The one contract between the trainer and every model (two-tower and fusion alike).

(``Batch``, ``PairFeatures``, ``StepOutput`` and ``ObjectiveError`` are defined in ``plait.types``.)

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

from typing import ClassVar

import torch
from torch import nn

from plait.types import Batch, ObjectiveError, PairFeatures, StepOutput


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
    ``contrastive_features``; a model with losses of its own (fusion) extends it.

    What a model can do is declared on its class, and read from there by config validation
    (before anything is built) and by the trainer (never by ``hasattr`` or a kind name):

    - ``own_contrastive_term``: the model computes a contrastive term of its own (the fusion
      model's momentum ITC), so ``loss.name: momentum_itc`` (no base loss) is valid for it;
    - ``provides_augmented``: its features already carry the regularisers' second views (the
      fusion model's momentum features), so the trainer draws no augmented views for it;
    - ``min_rows_per_process``: the fewest rows of a batch each torchrun process must hold;
    - ``supports_grad_cache``: its loss is a function of its contrastive features alone, so the
      gradient cache (``train.grad_cache_chunk``) may recompute them chunk by chunk;
    - ``accepts_bank_features``: it passes a momentum encoder's features to a memory bank
      (``train.bank_momentum``).

    ``from_config(config, inputs, *, independent, allow_import, device, seed)`` builds the model
    from a config's ``model`` section (``plait.models.build_model`` calls it for ``model.kind``).
    """

    own_contrastive_term: ClassVar[bool] = False
    provides_augmented: ClassVar[bool] = False
    min_rows_per_process: ClassVar[int] = 1
    supports_grad_cache: ClassVar[bool] = True
    accepts_bank_features: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: dict, inputs, *, independent: bool = False, allow_import: bool = False,
                    device=None, seed: int = 0) -> ContrastiveModel:  # pragma: no cover - every model defines it
        raise NotImplementedError

    def contrastive_features(self, batch: Batch):  # pragma: no cover - every model defines it
        raise NotImplementedError

    def training_step(self, batch: Batch, objective: nn.Module) -> StepOutput:
        features = self.contrastive_features(batch)
        loss = apply_objective(objective, features)
        return StepOutput(loss, dict(getattr(objective, "stats", {})), features)

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step taken; nothing to do for a plain model."""


__all__ = ["Batch", "ContrastiveModel", "ObjectiveError", "PairFeatures", "StepOutput", "apply_objective"]
