"""What the trainer may ask of a contrastive loss, declared on the loss class.

Every plait loss derives from :class:`ContrastiveLoss` and is called as
``loss(features_a, features_b, logit_scale=None, *, index=...)`` (open_clip's order: the scale is
the third positional argument). A loss with per-sample state may need more from the training loop
than features; it says so here, and the trainer (``plait.training.callbacks``) reads only this:

- ``reads_candidates``: it may want every training item's current features before a step
  (:meth:`needs_candidates`, then :meth:`refresh_bank`): the gamma loss's ``exact`` table each
  step, its ``memory`` bank every ``bank_refresh_steps``;
- ``reports_staleness``: :meth:`staleness` compares its per-sample state with a frozen snapshot
  of every item's features (logged each ``train.staleness_every_epochs``);
- :meth:`uses_memory_bank`: it keeps a bank of candidate features, which a momentum encoder may
  fill (``train.bank_momentum``, passed as ``bank_features=``).

Example (a loss that needs none of it)::

    class MyLoss(ContrastiveLoss):
        def forward(self, features_a, features_b, logit_scale=None, *, index=None):
            ...
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn


class ContrastiveLoss(nn.Module):
    """Base of plait's contrastive losses: the capabilities the training loop reads (all off)."""

    reads_candidates: ClassVar[bool] = False
    reports_staleness: ClassVar[bool] = False

    def needs_candidates(self, dim: int) -> bool:
        """Whether the next step wants :meth:`refresh_bank` with every item's current (N, dim) features."""
        return False

    def refresh_bank(self, features_a: Tensor, features_b: Tensor) -> None:  # pragma: no cover - only if reads_candidates
        """Take every item's current features (N, d) before the step."""
        raise NotImplementedError(f"{type(self).__name__} reads no candidates")

    def uses_memory_bank(self, dim: int) -> bool:
        """Whether features of dimension ``dim`` go to a memory bank (a momentum encoder may fill it)."""
        return False

    def staleness(self, features_a: Tensor, features_b: Tensor, logit_scale=None, batch_size: int = 32,
                  seed: int = 0) -> dict[str, float]:  # pragma: no cover - only if reports_staleness
        """Statistics of the per-sample state's error against a snapshot of all N items' features."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample state")
