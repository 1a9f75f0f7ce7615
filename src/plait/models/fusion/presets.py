"""Named sizes of the fusion model (``PRESETS``) and ``build_fusion_model``, which builds one from a
config's ``model`` section."""

from __future__ import annotations

import contextlib
import inspect

import torch

from plait.models.fusion.model import FusionModel

PRESETS: dict[str, dict] = {
    # 2 CPU cores, minutes: 0.36 M parameters besides the 30,522 x 64 word embeddings (1.95 M)
    "tiny": dict(image_size=32, patch=8, vision_width=64, vision_layers=2, vision_heads=4, width=64, heads=4,
                 text_layers=2, fusion_layers=2, embed_dim=64, queue_size=1024, max_length=32),
    "small": dict(image_size=32, patch=4, vision_width=128, vision_layers=4, vision_heads=4, width=128, heads=4,
                  text_layers=2, fusion_layers=2, embed_dim=128, queue_size=1024, max_length=32),
    # MiniLM's width: its first 3 layers as the text encoder, its last 3 as the fusion layers
    "minilm": dict(image_size=32, patch=4, vision_width=192, vision_layers=4, vision_heads=6, width=384, heads=12,
                   text_layers=3, fusion_layers=3, embed_dim=256, queue_size=4096, max_length=32, init="minilm"),
    "base": dict(image_size=64, patch=8, vision_width=384, vision_layers=8, vision_heads=6, width=384, heads=12,
                 text_layers=3, fusion_layers=3, embed_dim=256, queue_size=16384, max_length=40, init="minilm"),
}


def preset_options(name: str, **overrides) -> dict:
    """The ``FusionModel`` options of the preset ``name`` (tiny, small, minilm, base) with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown fusion preset {name!r}; valid: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def build_fusion_model(spec: dict | None = None) -> FusionModel:
    """A FusionModel from a config's ``model`` section: ``{"kind": "fusion", "preset": "tiny",
    **options}`` (``kind`` ignored; options override the preset, checked against the signature)."""
    options = dict(spec or {})
    options.pop("kind", None)
    preset = options.pop("preset", "tiny")
    accepted = set(inspect.signature(FusionModel.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"fusion model has no option {', '.join(map(repr, unknown))}; "
                         f"its options: preset, {', '.join(sorted(accepted))}")
    return FusionModel.preset(preset, **options)


def fusion_from_config(config: dict, inputs, *, independent: bool = False, device=None, seed: int = 0) -> FusionModel:
    """``model.kind: fusion``: ``model.fusion`` holds the options over a preset (``{preset: tiny,
    queue_size: 1024, ...}``); ``model.embed_dim``, ``model.init_temperature`` and
    ``model.learn_temperature`` apply; the image size comes from ``inputs`` (a dataset or an input
    spec); ``seed`` (unless ``model.fusion.seed`` is set) seeds the model's own draws (masks, hard
    negatives). Needs image-text data."""
    from plait.models.inputs import input_spec

    spec = inputs if isinstance(inputs, dict) else input_spec(inputs)
    if list(spec["modalities"]) != ["image", "text"] or spec["shapes"][0] is None:
        raise ValueError(f"model.kind=fusion needs image-text pairs, the data give {' and '.join(spec['modalities'])}")
    embed_dim = config.get("embed_dim", 128)  # checked by plait.models.build_model
    options = {"seed": seed, **(config.get("fusion") or {})}
    options.setdefault("embed_dim", embed_dim)
    options.setdefault("init_temperature", config.get("init_temperature", 0.07))
    options.setdefault("learn_temperature", config.get("learn_temperature", True))
    options["image_size"] = spec["shapes"][0][-1]
    options["independent"] = bool(independent or options.get("independent", False))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return build_fusion_model(options)


__all__ = ["PRESETS", "build_fusion_model", "fusion_from_config", "preset_options"]
