"""Checkpoints and exported weights.

- ``save_checkpoint``: everything a run needs to resume (model, optimiser, scheduler, loss
  state, random states, data position, config), written atomically (``plait.atomic``): an
  interrupted write leaves the previous file whole.
- ``load_checkpoint``: ``torch.load(weights_only=True)``, so a checkpoint can never run code.
- ``export_weights`` / ``load_weights``: the model's tensors as safetensors, with the run's
  config in the file's metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from plait.atomic import atomic_write

FORMAT = "plait-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    payload = {"format": FORMAT, **state}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} is not a loadable plait checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a plait checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return state


def export_weights(model: nn.Module, path: str | Path, config_yaml: str) -> Path:
    """The model's parameters and buffers as safetensors, with ``config`` in the metadata."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    data = save(tensors, metadata={"format": "plait-weights-1", "config": config_yaml})
    return atomic_write(path, lambda handle: handle.write(data))


def load_weights(path: str | Path) -> tuple[dict, str]:
    """(state_dict, config yaml) from an exported safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} has no plait config in its metadata; was it written by plait export?")
    return load_file(str(path)), metadata["config"]
