"""Encoders, the two-tower model, and ``build_model`` from a config."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math

import torch
from torch import nn

from plait.models.text import BagOfWordsEncoder, MiniLMEncoder, TransformerTextEncoder, WordPieceTokenizer
from plait.models.two_tower import MAX_LOGIT_SCALE, ProjectionHead, TwoTower
from plait.models.vision import MLPEncoder, SmallCNN, SmallViT
from plait.registry import Registry

ENCODERS = Registry("encoder")
ENCODERS.register("mlp", MLPEncoder)
ENCODERS.register("cnn", SmallCNN)
ENCODERS.register("vit", SmallViT)
ENCODERS.register("bow", BagOfWordsEncoder)
ENCODERS.register("transformer", TransformerTextEncoder)
ENCODERS.register("minilm", MiniLMEncoder)

__all__ = [
    "BagOfWordsEncoder", "ENCODERS", "MAX_LOGIT_SCALE", "MLPEncoder", "MiniLMEncoder", "ProjectionHead", "SmallCNN",
    "SmallViT", "TransformerTextEncoder", "TwoTower", "WordPieceTokenizer", "build_encoder", "build_model", "check_input_spec", "check_size",
    "input_spec",
]


MAX_SIZE = 1 << 20  # a width, depth, length or dimension larger than this is refused, not allocated
MAX_VIEW_ELEMENTS = 1 << 24  # one item's view in an input spec: at most 16M numbers (a 3x2365x2365 image)
# integer options of the built-in encoders that size tensors: each must be in [1, MAX_SIZE] (depth: [0, MAX_SIZE])
SIZE_OPTIONS = ("in_dim", "out_dim", "width", "in_channels", "image_size", "patch", "depth", "heads", "embed_dim", "max_length")
# built (once) for real even when a model is sized on the meta device: pretrained weights are read from disk
_REAL_ONLY = (MiniLMEncoder,)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_size(key: str, value, minimum: int = 1) -> None:
    """A size option: an int in [minimum, MAX_SIZE], else a ValueError naming ``key``."""
    if not (_integer(value) and minimum <= value <= MAX_SIZE):
        raise ValueError(f"{key}={value!r} is not valid: it must be an integer in [{minimum}, {MAX_SIZE}]")


def _check_builtin_options(cls, spec: dict, key: str) -> None:
    """The sizes and rates of a built-in encoder's options, named by their key, before any tensor exists."""
    for option in SIZE_OPTIONS:
        if option in spec:
            check_size(f"{key}.{option}", spec[option], minimum=0 if option == "depth" else 1)
    if "hidden" in spec:
        hidden = spec["hidden"]
        if not isinstance(hidden, (list, tuple)) or len(hidden) > 64:
            raise ValueError(f"{key}.hidden={hidden!r} is not valid: it must be a list of at most 64 layer widths")
        for n, width in enumerate(hidden):
            check_size(f"{key}.hidden[{n}]", width)
    if "dropout" in spec:
        rate = spec["dropout"]
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0):
            raise ValueError(f"{key}.dropout={rate!r} is not valid: it must be a number in [0, 1)")
    if "heads" in spec or "width" in spec:
        if cls in (SmallViT, TransformerTextEncoder):
            defaults = inspect.signature(cls.__init__).parameters
            width = spec.get("width", defaults["width"].default)
            heads = spec.get("heads", defaults["heads"].default)
            if width % heads:
                raise ValueError(f"{key}: width={width} is not a multiple of heads={heads}")


def build_encoder(spec: dict, sample, allow_import: bool = False, key: str = "encoder") -> nn.Module:
    """An encoder from ``{"name": ..., **options}``; ``name`` is a built-in (mlp, cnn, vit, bow,
    transformer, minilm) or, only with ``allow_import`` (the command line's ``--allow-import``),
    ``"package.module:Class"`` for an nn.Module subclass with an ``out_dim``. ``sample`` is one view of
    a dataset item (only its shape is read: a tensor on the meta device will do), used to size an
    MLP's input. Sizes are checked before anything is allocated; errors name ``key`` (``model.a``)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"{key}: an encoder spec needs a name, got {str(spec)[:80]}")
    if ":" in name:
        if not allow_import:
            raise ValueError(f"encoder {name!r} is an import path; importing code named in a config needs "
                             f"--allow-import on the command line (built-in encoders: {', '.join(ENCODERS)})")
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"encoder {name!r} cannot be imported: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):  # never call a function such as os:system
            raise ValueError(f"encoder {name!r} is not an nn.Module class (it is {type(cls).__name__} {cls!r:.60}); "
                             "--allow-import only constructs nn.Module subclasses")
    elif name in ENCODERS:
        cls = ENCODERS.get(name)
        _check_builtin_options(cls, spec, key)
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
    try:  # a built-in's options are checked by the registry (a ValueError listing them)
        encoder = ENCODERS.build(name, **spec) if ":" not in name else cls(**spec)
    except TypeError as error:
        raise ValueError(f"encoder {name!r}: {error}") from error
    out_dim = getattr(encoder, "out_dim", None)
    if not (_integer(out_dim) and 1 <= out_dim <= MAX_SIZE):
        raise ValueError(f"encoder {name!r} has no valid out_dim (got {out_dim!r:.40}): an encoder must say its output width")
    return encoder


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
    """An input spec read from a file, checked to be of :func:`input_spec`'s form, with views of at
    most 4 dimensions and ``MAX_VIEW_ELEMENTS`` numbers (a crafted spec must not size a huge model)."""
    valid_modalities = ("image", "text", "vector")

    def view(shape) -> bool:
        return shape is None or (isinstance(shape, list) and 0 < len(shape) <= 4 and all(_integer(n) and n > 0 for n in shape)
                                 and math.prod(shape) <= MAX_VIEW_ELEMENTS)

    ok = isinstance(spec, dict) and isinstance(spec.get("modalities"), list) and isinstance(spec.get("shapes"), list)
    ok = ok and len(spec["modalities"]) == 2 and len(spec["shapes"]) == 2
    ok = ok and all(isinstance(m, str) and m in valid_modalities for m in spec["modalities"])
    ok = ok and all(view(s) for s in spec["shapes"])
    ok = ok and all((shape is None) == (modality == "text") for modality, shape in zip(spec["modalities"], spec["shapes"]))
    if not ok:
        raise ValueError(f"{source}: malformed input spec {str(spec)[:80]!r} (two views: text, or image/vector of "
                         f"at most 4 dimensions and {MAX_VIEW_ELEMENTS} numbers)")
    return spec


def _samples(inputs) -> tuple[list[str], tuple]:
    """(modalities, (sample_a, sample_b)) from a dataset or an input spec; tensor views are shapes
    only (meta tensors: nothing is allocated)."""
    spec = inputs if isinstance(inputs, dict) else input_spec(inputs)
    samples = tuple("text" if shape is None else torch.empty(shape, device="meta") for shape in spec["shapes"])
    return spec["modalities"], samples


def build_fusion(config: dict, inputs, independent: bool = False, device=None):
    """A ``FusionModel`` (ALBEF-style) from a config's ``model`` section: ``model.fusion`` holds
    its options over a preset (``{preset: tiny, queue_size: 1024, ...}``), ``model.embed_dim`` and
    ``model.init_temperature`` apply, the image size comes from the inputs. Needs image-text data."""
    from plait.models.fusion import build_fusion_model

    spec = inputs if isinstance(inputs, dict) else input_spec(inputs)
    if list(spec["modalities"]) != ["image", "text"] or spec["shapes"][0] is None:
        raise ValueError(f"model.kind=fusion needs image-text pairs, the data give {' and '.join(spec['modalities'])}")
    options = dict(config.get("fusion") or {})
    if not isinstance(options, dict):
        raise ValueError("model.fusion: expected a mapping of FusionModel options")
    embed_dim = config.get("embed_dim", 128)
    check_size("model.embed_dim", embed_dim)
    options.setdefault("embed_dim", embed_dim)
    options.setdefault("init_temperature", config.get("init_temperature", 0.07))
    options.setdefault("learn_temperature", config.get("learn_temperature", True))
    options["image_size"] = spec["shapes"][0][-1]
    options["independent"] = bool(independent or options.get("independent", False))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return build_fusion_model(options)


def build_model(config: dict, inputs, independent: bool = False, allow_import: bool = False, device=None) -> TwoTower:
    """A TwoTower from the ``model`` section of a config and its inputs: a dataset or an
    :func:`input_spec` (for input sizes). An empty encoder spec picks the modality's default:
    cnn (image), bow (text), mlp (vector). Sizes are checked first (a ValueError naming the key);
    ``device="meta"`` builds the model's shapes only (no memory; MiniLM, whose weights come from
    disk, is built for real), to compare with a file's tensors before the real model exists."""
    if not isinstance(config, dict):
        raise ValueError(f"model: expected a mapping, got {type(config).__name__}")
    kind = config.get("kind", "two_tower")
    if kind not in MODEL_KINDS or MODEL_KINDS.resolve(kind) != kind:  # exactly as written: train.py compares it
        raise ValueError(f"model.kind={kind!r} is not a model kind; valid: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS.build(kind, fill={"config": config, "inputs": inputs, "independent": independent,
                                         "allow_import": allow_import, "device": device})


def build_two_tower(config: dict, inputs, independent: bool = False, allow_import: bool = False, device=None) -> TwoTower:
    """``model.kind: two_tower`` (the default) of :func:`build_model`."""
    modalities, (sample_a, sample_b) = _samples(inputs)
    embed_dim = config.get("embed_dim", 128)
    check_size("model.embed_dim", embed_dim)
    projection_hidden = config.get("projection_hidden", 0)
    check_size("model.projection_hidden", projection_hidden, minimum=0)
    temperature = config.get("init_temperature", 0.07)
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature)
            and 0 < temperature):
        raise ValueError(f"model.init_temperature={temperature!r} is not valid: it must be a positive number")
    specs = []
    for side, modality in zip("ab", modalities):
        spec = config.get(side) or DEFAULT_ENCODERS[modality]
        if not isinstance(spec, dict):
            raise ValueError(f"model.{side}: expected an encoder spec {{name: ..., ...}}, got {str(spec)[:60]!r}")
        specs.append(spec)

    def encoder(side: str, spec: dict, sample) -> nn.Module:
        key = f"model.{side}"
        name = spec.get("name")
        real_only = isinstance(name, str) and ENCODERS.get(name) in _REAL_ONLY
        if device is not None and str(device) == "meta" and not real_only:
            with torch.device("meta"):
                return build_encoder(spec, sample, allow_import, key=key)
        return build_encoder(spec, sample, allow_import, key=key)

    encoder_a = encoder("a", specs[0], sample_a)
    encoder_b = encoder("b", specs[1], sample_b)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return TwoTower(
            encoder_a, encoder_b,
            embed_dim=embed_dim,
            init_temperature=temperature,
            learn_temperature=config.get("learn_temperature", True),
            projection_hidden=projection_hidden,
            independent=independent,
        )


MODEL_KINDS = Registry("model kind")  # model.kind -> the builder of that model (called by build_model)
MODEL_KINDS.register("two_tower", build_two_tower)
MODEL_KINDS.register("fusion", build_fusion)
