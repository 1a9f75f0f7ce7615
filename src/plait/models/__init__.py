"""Encoders, the two-tower model, and ``build_model`` from a config."""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from plait.models.text import BagOfWordsEncoder, MiniLMEncoder, TransformerTextEncoder, WordPieceTokenizer
from plait.models.two_tower import MAX_LOGIT_SCALE, ProjectionHead, TwoTower
from plait.models.vision import MLPEncoder, SmallCNN, SmallViT

ENCODERS = {
    "mlp": MLPEncoder,
    "cnn": SmallCNN,
    "vit": SmallViT,
    "bow": BagOfWordsEncoder,
    "transformer": TransformerTextEncoder,
    "minilm": MiniLMEncoder,
}

__all__ = [
    "BagOfWordsEncoder", "ENCODERS", "MAX_LOGIT_SCALE", "MLPEncoder", "MiniLMEncoder", "ProjectionHead", "SmallCNN",
    "SmallViT", "TransformerTextEncoder", "TwoTower", "WordPieceTokenizer", "build_encoder", "build_model", "check_input_spec", "input_spec",
]


def build_encoder(spec: dict, sample, allow_import: bool = False) -> nn.Module:
    """An encoder from ``{"name": ..., **options}``; ``name`` is a built-in (mlp, cnn, vit, bow,
    transformer, minilm) or, only with ``allow_import`` (the command line's ``--allow-import``),
    ``"package.module:Class"`` for any nn.Module with an ``out_dim``. ``sample`` is one view of a
    dataset item, used to size an MLP's input."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"an encoder spec needs a name, got {spec}")
    if ":" in name:
        if not allow_import:
            raise ValueError(f"encoder {name!r} is an import path; importing code named in a config needs "
                             f"--allow-import on the command line (built-in encoders: {', '.join(ENCODERS)})")
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"encoder {name!r} cannot be imported: {error}") from error
    elif name in ENCODERS:
        cls = ENCODERS[name]
    else:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ENCODERS)} or 'package.module:Class'")
    if cls is MLPEncoder and "in_dim" not in spec:
        if not isinstance(sample, torch.Tensor):
            raise ValueError("the mlp encoder takes tensors; use bow, transformer or minilm for text")
        spec["in_dim"] = math.prod(sample.shape)
    if cls is SmallViT and "image_size" not in spec and isinstance(sample, torch.Tensor):
        spec["image_size"] = sample.shape[-1]
    if "hidden" in spec and isinstance(spec["hidden"], list):
        spec["hidden"] = tuple(spec["hidden"])
    try:
        return cls(**spec)
    except TypeError as error:
        raise ValueError(f"encoder {name!r}: {error}") from error


DEFAULT_ENCODERS = {"image": {"name": "cnn"}, "text": {"name": "bow"}, "vector": {"name": "mlp"}}


def input_spec(dataset) -> dict:
    """What a model needs to know of its data, as plain JSON-able values: the two views'
    modalities and, for tensor views, one item's shape. Stored with checkpoints and exported
    weights, so a saved model is rebuilt without its training data."""
    _, sample_a, sample_b = dataset[0]
    modalities = list(getattr(dataset, "modalities", ("image", "text")))
    shapes = [list(sample.shape) if torch.is_tensor(sample) else None for sample in (sample_a, sample_b)]
    return {"modalities": modalities, "shapes": shapes}


def check_input_spec(spec, source: str = "input spec") -> dict:
    """An input spec read from a file, checked to be of :func:`input_spec`'s form."""
    valid_modalities = ("image", "text", "vector")
    ok = isinstance(spec, dict) and isinstance(spec.get("modalities"), list) and isinstance(spec.get("shapes"), list)
    ok = ok and len(spec["modalities"]) == 2 and len(spec["shapes"]) == 2
    ok = ok and all(m in valid_modalities for m in spec["modalities"])
    ok = ok and all(s is None or (isinstance(s, list) and 0 < len(s) <= 4 and all(isinstance(n, int) and 0 < n <= 1 << 20 for n in s))
                    for s in spec["shapes"])
    if not ok:
        raise ValueError(f"{source}: malformed input spec {str(spec)[:80]!r}")
    return spec


def _samples(inputs) -> tuple[list[str], tuple]:
    """(modalities, (sample_a, sample_b)) from a dataset or an input spec."""
    spec = inputs if isinstance(inputs, dict) else input_spec(inputs)
    samples = tuple("text" if shape is None else torch.zeros(shape) for shape in spec["shapes"])
    return spec["modalities"], samples


def build_model(config: dict, inputs, independent: bool = False, allow_import: bool = False) -> TwoTower:
    """A TwoTower from the ``model`` section of a config and its inputs: a dataset or an
    :func:`input_spec` (for input sizes). An empty encoder spec picks the modality's default:
    cnn (image), bow (text), mlp (vector)."""
    modalities, (sample_a, sample_b) = _samples(inputs)
    encoder_a = build_encoder(config.get("a") or DEFAULT_ENCODERS[modalities[0]], sample_a, allow_import)
    encoder_b = build_encoder(config.get("b") or DEFAULT_ENCODERS[modalities[1]], sample_b, allow_import)
    return TwoTower(
        encoder_a, encoder_b,
        embed_dim=config.get("embed_dim", 128),
        init_temperature=config.get("init_temperature", 0.07),
        learn_temperature=config.get("learn_temperature", True),
        projection_hidden=config.get("projection_hidden", 0),
        independent=independent,
    )
