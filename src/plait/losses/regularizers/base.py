"""What a structure regulariser declares: the features it reads, and its named parts."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn


class Regularizer(nn.Module):
    """Base of the modality structure regularisers.

    ``needs`` names the :class:`plait.types.PairFeatures` fields ``forward`` takes, in order
    (``a`` = image, ``b`` = text in image-text data; ``*_aug`` second augmented views, ``*_ind``
    independent features). The objective (``plait.losses.objective.ContrastiveObjective``) calls
    ``module(*(getattr(features, name) for name in module.needs))`` and refuses a batch that
    lacks one; a model builds independent heads when some regulariser needs ``a_ind``.
    ``forward`` returns a scalar; ``parts`` holds its named terms of the last call (detached).
    """

    needs: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self):
        super().__init__()
        self.parts: dict[str, Tensor] = {}
