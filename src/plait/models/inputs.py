"""A model's inputs as plain values: the two views' modalities and shapes (stored with weights)."""

from __future__ import annotations

import math

import torch

from plait._checks import is_int

MAX_VIEW_ELEMENTS = 1 << 24  # one item's view in an input spec: at most 16M numbers (a 3x2365x2365 image)
VIEW_MODALITIES = ("image", "text", "vector")


def input_spec(dataset) -> dict:
    """What a model needs to know of its data, as plain JSON-able values: the two views'
    modalities and, for tensor views, one item's shape. Stored with checkpoints and exported
    weights, so a saved model is rebuilt without its training data.

    Example: ``{"modalities": ["image", "text"], "shapes": [[3, 8, 8], None]}``."""
    _, sample_a, sample_b = dataset[0]
    modalities = list(getattr(dataset, "modalities", ("image", "text")))
    shapes = [list(sample.shape) if torch.is_tensor(sample) else None for sample in (sample_a, sample_b)]
    return {"modalities": modalities, "shapes": shapes}


def check_input_spec(spec, source: str = "input spec") -> dict:
    """An input spec read from a file, checked to be of :func:`input_spec`'s form, with views of at
    most 4 dimensions and ``MAX_VIEW_ELEMENTS`` numbers (a crafted spec must not size a huge model)."""

    def view(shape) -> bool:
        return shape is None or (isinstance(shape, list) and 0 < len(shape) <= 4 and all(is_int(n) and n > 0 for n in shape)
                                 and math.prod(shape) <= MAX_VIEW_ELEMENTS)

    ok = isinstance(spec, dict) and isinstance(spec.get("modalities"), list) and isinstance(spec.get("shapes"), list)
    ok = ok and len(spec["modalities"]) == 2 and len(spec["shapes"]) == 2
    ok = ok and all(isinstance(m, str) and m in VIEW_MODALITIES for m in spec["modalities"])
    ok = ok and all(view(s) for s in spec["shapes"])
    ok = ok and all((shape is None) == (modality == "text") for modality, shape in zip(spec["modalities"], spec["shapes"]))
    if not ok:
        raise ValueError(f"{source}: malformed input spec {str(spec)[:80]!r} (two views: text, or image/vector of "
                         f"at most 4 dimensions and {MAX_VIEW_ELEMENTS} numbers)")
    return spec


def meta_samples(inputs) -> tuple[list[str], tuple]:
    """(modalities, (sample_a, sample_b)) from a dataset or an input spec; tensor views are shapes
    only (meta tensors: nothing is allocated), text views the string ``"text"``."""
    spec = inputs if isinstance(inputs, dict) else input_spec(inputs)
    samples = tuple("text" if shape is None else torch.empty(shape, device="meta") for shape in spec["shapes"])
    return spec["modalities"], samples
