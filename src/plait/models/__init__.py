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
    "SmallViT", "TransformerTextEncoder", "TwoTower", "WordPieceTokenizer", "build_encoder", "build_model",
]


def build_encoder(spec: dict, sample) -> nn.Module:
    """An encoder from ``{"name": ..., **options}``; ``name`` is a built-in (mlp, cnn, vit, bow,
    transformer, minilm) or ``"package.module:Class"`` for any nn.Module with an ``out_dim``.
    ``sample`` is one view of a dataset item, used to size an MLP's input."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise ValueError(f"an encoder spec needs a name, got {spec}")
    if ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
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


def build_model(config: dict, dataset, independent: bool = False) -> TwoTower:
    """A TwoTower from the ``model`` section of a config and a dataset (for input sizes).
    An empty encoder spec picks the modality's default: cnn (image), bow (text), mlp (vector)."""
    _, sample_a, sample_b = dataset[0]
    modalities = getattr(dataset, "modalities", ("image", "text"))
    encoder_a = build_encoder(config.get("a") or DEFAULT_ENCODERS[modalities[0]], sample_a)
    encoder_b = build_encoder(config.get("b") or DEFAULT_ENCODERS[modalities[1]], sample_b)
    return TwoTower(
        encoder_a, encoder_b,
        embed_dim=config.get("embed_dim", 128),
        init_temperature=config.get("init_temperature", 0.07),
        learn_temperature=config.get("learn_temperature", True),
        projection_hidden=config.get("projection_hidden", 0),
        independent=independent,
    )
