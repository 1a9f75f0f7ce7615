"""Device, precision and random state: the one place that knows where a run executes.

(torchrun / DDP process-group handling lives beside this, in ``plait.distributed``.)
"""

from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

DEVICES = "auto, cpu, cuda, cuda:N (N: a GPU's index), mps"


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else CPU; otherwise the named device (checked: a ValueError
    naming ``train.device`` and the valid forms for anything else or a device this machine lacks)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"train.device={name!r} is not a device plait runs on; valid: {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             "(cuda:0 ...)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"train.device={name!r} but MPS is not available on this machine")
    return device


def progress_bar(total: int, enabled: bool = True, **options):
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal: in a log file or
    a pipe a bar writes thousands of ``\\r`` lines."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not (enabled and sys.stderr.isatty()), file=sys.stderr, **options)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision``: auto -> bf16 on CUDA, none (fp32) on CPU; fp64
    (parameters in float64, :func:`parameter_dtype`) autocasts nothing."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision != "fp64" and precision not in AUTOCAST_DTYPES:
        raise ValueError(f"train.precision must be one of auto, fp32, fp64, bf16, fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")
    return AUTOCAST_DTYPES.get(precision)


def precision_name(autocast: torch.dtype | None, parameters: torch.dtype | None = None) -> str:
    """The name a run's precision is recorded under: fp64 (parameters in float64), else the
    autocast dtype's (fp32: none, bf16, fp16)."""
    if parameters == torch.float64:
        return "fp64"
    return next((name for name, dtype in AUTOCAST_DTYPES.items() if dtype == autocast), str(autocast))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a context that does nothing when
    ``dtype`` is None (fp32 / fp64)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def parameter_dtype(precision: str) -> torch.dtype | None:
    """The dtype parameters and inputs are cast to: float64 for ``train.precision=fp64`` (exact
    comparisons, e.g. distributed against one process), else None (the model's own, float32)."""
    return torch.float64 if precision == "fp64" else None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's (``seed`` mod 2^32) and torch's random generators; ``deterministic``
    also makes torch use deterministic algorithms only (and turns cuDNN's benchmark off)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every global random state, as tensors and plain values (loadable with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(tensor) -> torch.Tensor:
    """A random state as torch wants it: a CPU uint8 tensor (a checkpoint loaded with another
    map_location may hold it on a GPU)."""
    return tensor.detach().to("cpu", torch.uint8)


def check_rng_state(state) -> None:
    """A state of :func:`rng_state`'s form, each part loadable: tried on throwaway generators (the
    global random state is untouched). A ValueError names the part."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        raise ValueError("torch, numpy or python is missing")
    try:
        torch.Generator().set_state(_cpu_bytes(state["torch"]))
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"torch: {str(error).splitlines()[0][:120] if str(error) else type(error).__name__}") from None
    numpy = state["numpy"]
    try:
        np.random.RandomState().set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
                                           numpy["has_gauss"], numpy["cached"]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"numpy: {type(error).__name__} {str(error)[:120]}") from None
    try:
        random.Random().setstate(_as_tuples(state["python"]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"python: {str(error)[:120]}") from None
    cuda = state.get("cuda")
    if cuda is not None:
        if not (isinstance(cuda, (list, tuple)) and all(torch.is_tensor(t) and t.dim() == 1 for t in cuda)):
            raise ValueError("cuda: not a list of generator states")


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (tensors on any device or of another integer dtype are
    brought back to CPU uint8 first)."""
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_cpu_bytes(t) for t in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another number of GPUs: the states of the devices both have
            for index, t in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(t, index)


def _as_tuples(value):
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuples(v) for v in value)
    return value
