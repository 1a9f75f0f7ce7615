"""The encoder protocol and its registry: one view of a batch -> (B, out_dim) features.

An encoder is an ``nn.Module`` whose ``forward`` maps a batch of one view (a tensor (B, ...) for
images and vectors, a list of B strings for text) to (B, out_dim) features. plait's built-in
encoders derive from :class:`Encoder` and register themselves where they are defined::

    @ENCODERS.register("mlp")
    class MLPEncoder(Encoder):
        modality = "tensor"
        size_options = ("in_dim", "out_dim")

        @classmethod
        def from_sample(cls, sample, options):
            return {"in_dim": math.prod(sample.shape), **options}

A config names one as ``model.a: {name: mlp, out_dim: 64}``; :func:`build_encoder` checks its
options (sizes before anything is allocated, unknown options against the constructor's
signature) and completes them from one item's view. A class outside plait (``package.module:Class``,
only with ``--allow-import``) needs only ``forward`` and an ``out_dim``; deriving from
:class:`Encoder` gives it the same checks.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, ClassVar

from torch import nn

from plait._checks import check_int
from plait.registry import Registry

ENCODERS = Registry("encoder")
MAX_SIZE = 1 << 20  # a width, depth, length or dimension larger than this is refused, not allocated


class Encoder(nn.Module):
    """Base of plait's encoders: what a model builder, config validation and (for pretrained
    weights) preprocessing need to know of an encoder class, declared on the class.

    - ``modality``: the view it reads: ``image`` (B, C, H, W), ``vector`` (B, ...), ``tensor``
      (either), ``text`` (B strings);
    - ``size_options``: integer options that size tensors, each checked in [1, ``MAX_SIZE``]
      (``zero_size_options``: [0, ``MAX_SIZE``]) before the constructor runs;
    - ``loads_weights``: it reads pretrained weights from disk, so it is built for real even
      when a model is only sized on the meta device;
    - ``out_dim``: the width of its output, set by the constructor;
    - :meth:`from_sample`: options completed from one item's view (an input width, an image size);
    - :meth:`check_options`: checks of option values beyond their sizes;
    - :meth:`preprocessing`: what its input must be (image size, mean and std; tokenizer and
      maximum length), for whoever prepares the data.
    """

    modality: ClassVar[str] = "tensor"
    size_options: ClassVar[tuple[str, ...]] = ("out_dim",)
    zero_size_options: ClassVar[tuple[str, ...]] = ()
    loads_weights: ClassVar[bool] = False
    out_dim: int

    @classmethod
    def from_sample(cls, sample: Any, options: dict) -> dict:
        """``options`` completed from ``sample``, one item's view (a tensor, possibly on the meta
        device, or a string); the default takes nothing from it."""
        return options

    @classmethod
    def check_options(cls, options: dict, key: str) -> None:
        """Refuse option values that would fail later (a ValueError naming ``key.option``): sizes,
        a ``hidden`` list of widths, a ``dropout`` rate. Subclasses add their own rules."""
        for option in cls.size_options + cls.zero_size_options:
            if option in options:
                check_int(f"{key}.{option}", options[option], minimum=0 if option in cls.zero_size_options else 1,
                          maximum=MAX_SIZE)
        if "hidden" in options:
            hidden = options["hidden"]
            if not isinstance(hidden, (list, tuple)) or len(hidden) > 64:
                raise ValueError(f"{key}.hidden={hidden!r} is not valid: it must be a list of at most 64 layer widths")
            for n, width in enumerate(hidden):
                check_int(f"{key}.hidden[{n}]", width, minimum=1, maximum=MAX_SIZE)
        if "dropout" in options:
            rate = options["dropout"]
            if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0):
                raise ValueError(f"{key}.dropout={rate!r} is not valid: it must be a number in [0, 1)")

    def preprocessing(self) -> dict:
        """What the input must be, as plain values (``{}``: nothing beyond its modality)."""
        return {}


def check_heads_divide_width(cls: type, options: dict, key: str) -> None:
    """A transformer's ``width`` must be a multiple of its ``heads`` (defaults from the signature)."""
    if "heads" in options or "width" in options:
        defaults = inspect.signature(cls.__init__).parameters
        width, heads = options.get("width", defaults["width"].default), options.get("heads", defaults["heads"].default)
        if width % heads:
            raise ValueError(f"{key}: width={width} is not a multiple of heads={heads}")


def _imported_class(name: str) -> type:
    """The nn.Module class ``package.module:Class`` names (never a function such as os:system)."""
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"encoder {name!r} cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"encoder {name!r} is not an nn.Module class (it is {type(cls).__name__} {cls!r:.60}); "
                         "--allow-import only constructs nn.Module subclasses")
    return cls


def encoder_class(name, allow_import: bool = False) -> type:
    """The class an encoder spec's ``name`` names: a registered encoder or, only with
    ``allow_import`` (the command line's ``--allow-import``), ``package.module:Class``."""
    if not isinstance(name, str):
        raise ValueError(f"an encoder spec needs a name, got {name!r:.80}")
    if ":" in name:
        if not allow_import:
            raise ValueError(f"encoder {name!r} is an import path; importing code named in a config needs "
                             f"--allow-import on the command line (built-in encoders: {', '.join(ENCODERS)})")
        return _imported_class(name)
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ENCODERS)} or 'package.module:Class'")
    return ENCODERS.get(name)


def build_encoder(spec: dict, sample, allow_import: bool = False, key: str = "encoder") -> nn.Module:
    """An encoder from ``{"name": ..., **options}``; ``name`` is a registered encoder (mlp, cnn,
    vit, bow, transformer, minilm) or, only with ``allow_import``, ``"package.module:Class"`` for
    an nn.Module subclass with an ``out_dim``. ``sample`` is one view of a dataset item (only its
    shape is read: a meta tensor will do). Sizes are checked before anything is allocated; errors
    name ``key`` (``model.a``).

    Example: ``build_encoder({"name": "mlp", "out_dim": 32}, torch.empty(64, device="meta"))``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"{key}: an encoder spec needs a name, got {str(spec)[:80]}")
    cls = encoder_class(name, allow_import)
    is_encoder = isinstance(cls, type) and issubclass(cls, Encoder)
    if is_encoder and ":" not in name:
        cls.check_options(spec, key)
    if is_encoder:
        spec = cls.from_sample(sample, spec)
    if "hidden" in spec and isinstance(spec["hidden"], list):
        spec["hidden"] = tuple(spec["hidden"])
    try:  # a built-in's options are checked by the registry (a ValueError listing them)
        encoder = ENCODERS.build(name, **spec) if ":" not in name else cls(**spec)
    except TypeError as error:
        raise ValueError(f"encoder {name!r}: {error}") from error
    out_dim = getattr(encoder, "out_dim", None)
    if not (isinstance(out_dim, int) and not isinstance(out_dim, bool) and 1 <= out_dim <= MAX_SIZE):
        raise ValueError(f"encoder {name!r} has no valid out_dim (got {out_dim!r:.40}): an encoder must say its output width")
    return encoder
