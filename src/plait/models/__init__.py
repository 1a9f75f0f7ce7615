"""Encoders, the two-tower and fusion models, and ``build_model`` from a config.

Every encoder registers itself in :data:`ENCODERS` where it is defined (``plait.models.encoder``
has the protocol); every model kind is a class in :data:`MODEL_KINDS` with a ``from_config``
builder and its capabilities declared on the class (``plait.models.contract``).
"""

from __future__ import annotations

from plait._checks import check_int
from plait.models.contract import ContrastiveModel
from plait.models.encoder import ENCODERS, MAX_SIZE, Encoder, build_encoder, encoder_class
from plait.models.inputs import MAX_VIEW_ELEMENTS, check_input_spec, input_spec

# importing an encoder module registers its encoders: image towers first, then text
# isort: off
from plait.models.vision import MLPEncoder, SmallCNN, SmallViT
from plait.models.text import BagOfWordsEncoder, MiniLMEncoder, TransformerTextEncoder, WordPieceTokenizer
# isort: on

from plait.models.fusion import FusionModel
from plait.models.two_tower import DEFAULT_ENCODERS, MAX_LOGIT_SCALE, ProjectionHead, TwoTower
from plait.registry import Registry

MODEL_KINDS = Registry("model kind")  # model.kind -> the model class (its from_config builds it)
MODEL_KINDS.register("two_tower", TwoTower)
MODEL_KINDS.register("fusion", FusionModel)

__all__ = [
    "BagOfWordsEncoder", "ContrastiveModel", "DEFAULT_ENCODERS", "ENCODERS", "Encoder", "FusionModel", "MAX_LOGIT_SCALE",
    "MAX_SIZE", "MAX_VIEW_ELEMENTS", "MLPEncoder", "MODEL_KINDS", "MiniLMEncoder", "ProjectionHead", "SmallCNN", "SmallViT",
    "TransformerTextEncoder", "TwoTower", "WordPieceTokenizer", "build_encoder", "build_model", "check_input_spec",
    "encoder_class", "input_spec", "model_class",
]


def model_class(config: dict) -> type[ContrastiveModel]:
    """The class of a config's ``model`` section (``model.kind``, exactly as registered), without
    building anything: config validation reads its declared capabilities."""
    if not isinstance(config, dict):
        raise ValueError(f"model: expected a mapping, got {type(config).__name__}")
    kind = config.get("kind", "two_tower")
    if kind not in MODEL_KINDS or MODEL_KINDS.resolve(kind) != kind:
        raise ValueError(f"model.kind={kind!r} is not a model kind; valid: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS.get(kind)


def build_model(config: dict, inputs, independent: bool = False, allow_import: bool = False, device=None,
                seed: int = 0) -> ContrastiveModel:
    """The model of a config's ``model`` section, sized from ``inputs`` (a dataset or an
    :func:`input_spec`): ``model.kind`` picks the class, whose ``from_config`` checks the sizes
    first (a ValueError naming the key). ``device="meta"`` builds the shapes only (no memory;
    encoders that load weights from disk are built for real), to compare with a file's tensors
    before the real model exists. ``seed``: the model's own random draws (the fusion model's
    masks and hard negatives).

    Example: ``build_model({"a": {"name": "mlp"}, "embed_dim": 16}, dataset)``."""
    cls = model_class(config)
    check_int("model.embed_dim", config.get("embed_dim", 128), minimum=1, maximum=MAX_SIZE)  # every kind's features
    return cls.from_config(config, inputs, independent=independent, allow_import=allow_import, device=device, seed=seed)
