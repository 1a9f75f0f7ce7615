"""Checkpoints and exported weights.

- ``save_checkpoint``: everything a run needs to resume (model, optimiser, scheduler, loss
  state, random states, data position, config), written atomically (``plait.atomic``): an
  interrupted write leaves the previous file whole.
- ``load_checkpoint``: ``torch.load(weights_only=True)``, so a checkpoint can never run code:
  a pickle naming any global beyond tensors and plain containers is refused unread.
- ``export_weights`` / ``load_weights``: the model's tensors as safetensors, with the run's
  config and the model's input spec (``plait.models.input_spec``) in the file's metadata.

Both files are data that users exchange. Whatever is wrong with one (missing, truncated, not
a plait file, a crafted pickle, a malformed safetensors header) is a ValueError of one line
naming the file; the config inside is read by ``plait.config.load_stored_config`` (validated,
never interpolated, registered component names only).
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from plait.atomic import atomic_write
from plait.atomic import display_path as _show

FORMAT = "plait-checkpoint-1"
WEIGHTS_FORMAT = "plait-weights-1"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """``state`` (with the checkpoint format tag) written with ``torch.save``, atomically: an
    interrupted write leaves the previous checkpoint whole. Returns ``path``."""
    payload = {"format": FORMAT, **state}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The state dict a checkpoint holds, loaded with ``weights_only=True`` (no code runs); a
    missing, unreadable or non-plait file is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {_show(path)} does not exist")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": the refusal below says it in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {_show(path)} is not a loadable plait checkpoint: {_reason(error)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        shown = repr(state.get("format"))[:60] if isinstance(state, dict) else None
        raise ValueError(f"checkpoint {_show(path)} is not a plait checkpoint (format {shown})")
    return state


_OPCODES = {ord(op.code): op.name for op in pickletools.opcodes}


def _safetensors_reason(error: Exception) -> str:
    """The first line of a safetensors error (it names what is wrong with the header or the data)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _reason(error: Exception) -> str:
    """One line for a loader's error. torch's unpickler explains itself over many lines and
    advises re-running with ``weights_only=False``, which would run the file's code: that advice
    is never repeated; the refused global or opcode is named instead."""
    text = str(error)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return (f"its pickle names the global {found.group(1).rstrip('.')}, which is not a tensor or plain data "
                "(refused without running it)")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        code = int(found.group(1))
        name = _OPCODES.get(code)
        if name is None:
            return f"not a torch checkpoint (byte {code} is not a pickle opcode; nothing was run)"
        return (f"its pickle uses opcode {code} ({name}), which the weights-only loader refuses "
                "(nothing was run; not a file written by torch.save?)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    if "Weights only load failed" in text or isinstance(error, pickle.UnpicklingError):
        detail = next((line for line in lines if "WeightsUnpickler error" in line), "")
        return "refused by the weights-only loader (nothing was run)" + (f": {detail[:200]}" if detail else "")
    if isinstance(error, EOFError):
        return "the file ends early (truncated?; nothing was run)"
    if not isinstance(error, (RuntimeError, OSError)):  # KeyError: 101, pop from empty list, ...: the unpickler's own
        detail = f"{type(error).__name__}: {lines[0][:100]}" if lines else type(error).__name__
        return f"not a torch checkpoint (a malformed pickle, {detail}; nothing was run)"
    if not lines:
        return type(error).__name__
    first = lines[0].split(". ")[0].rstrip(".")  # torch's first sentence; the rest is advice
    return first[:300]


def export_weights(model: nn.Module, path: str | Path, config_yaml: str, inputs: dict | None = None) -> Path:
    """The model's parameters and buffers as safetensors, with ``config`` (and the model's
    ``inputs`` spec, JSON) in the metadata."""
    import json

    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": config_yaml}
    if inputs is not None:
        metadata["inputs"] = json.dumps(inputs)
    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda handle: handle.write(data))


def load_weights(path: str | Path, with_inputs: bool = False):
    """(state_dict, config yaml) from an exported safetensors file; with ``with_inputs``,
    (state_dict, config yaml, input spec or None)."""
    import json

    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {_show(path)} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read weights file {_show(path)}: {error.strerror or error}") from None
    metadata = _safetensors_metadata(data, path)
    if "config" not in metadata:
        raise ValueError(f"{_show(path)} has no plait config in its metadata; was it written by plait export?")
    try:
        state = load(data)
    except Exception as error:
        raise ValueError(f"{_show(path)} is not a readable safetensors file: {_safetensors_reason(error)}") from None
    inputs = None
    if "inputs" in metadata:
        try:
            inputs = json.loads(metadata["inputs"])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: malformed input spec in its metadata") from None
    return (state, metadata["config"], inputs) if with_inputs else (state, metadata["config"])


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, its header checked first: 8 bytes of length,
    then that many bytes of JSON within the file."""
    import json

    if len(data) < 8:
        raise ValueError(f"{_show(path)} is not a safetensors file (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size < 2 or 8 + size > len(data):
        raise ValueError(f"{_show(path)} is not a safetensors file or is truncated "
                         f"(header of {size} bytes in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{_show(path)} has a malformed safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{_show(path)} has a malformed safetensors header (not an object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{_show(path)} has malformed safetensors metadata")
    return metadata
