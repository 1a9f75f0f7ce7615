"""The values that cross package boundaries: a training batch, the features a model hands to its
objective, and what one training step returns.

They live here, in no package of their own, because every layer meets them: ``plait.training``
builds a :class:`Batch`, a model (``plait.models``) turns it into :class:`PairFeatures`, the
objective (``plait.losses``) reads them, ``plait.distributed`` gathers them over ranks and
``plait.grad_cache`` slices and joins them. Naming: ``a`` and ``b`` are the two views of an item
(a = image and b = text in image-text data; two modalities or two augmentations otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Batch:
    """One training batch on the device.

    ``index`` (B,) dataset indices; ``a``, ``b`` the training views (tensors (B, ...) or lists of
    strings); ``a_aug``, ``b_aug`` second augmented views when the objective asks for them
    (``objective.needs_augmented``); ``bank`` the (z_a, z_b) of a momentum copy of the model for
    the loss's memory bank (``train.bank_momentum``); ``extra`` anything a task adds (labels).

    Example::

        Batch(index=torch.arange(4), a=torch.randn(4, 3, 8, 8), b=["a cat", "a dog", "a cow", "a fox"])
    """

    index: Tensor
    a: Any
    b: Any
    a_aug: Any = None
    b_aug: Any = None
    bank: tuple[Tensor, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairFeatures:
    """One batch's features, all (B, d) and L2-normalised; augmented (``*_aug``) and independent
    (``*_ind``, feature separation) ones only when a term needs them.

    ``index`` (B,) dataset indices; ``logit_scale`` a scalar tensor (exp of the learned
    log-scale); ``a_bank``/``b_bank`` the same views through a momentum encoder (a memory bank's
    rows); ``gathered``: already the global batch of every rank
    (``plait.distributed.gather_features``). A regulariser names the fields it reads
    (``Regularizer.needs``); the objective refuses a batch that lacks one."""

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
    a_bank: Tensor | None = None
    b_bank: Tensor | None = None
    gathered: bool = False


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


__all__ = ["Batch", "ObjectiveError", "PairFeatures", "StepOutput"]
