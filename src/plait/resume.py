"""What a resume may change, and the checks that a checkpoint fits the run resuming from it:
the settings (key by key, with an allowlist) and the training data (a fingerprint)."""

from __future__ import annotations

import hashlib
import json

import torch
from omegaconf import DictConfig, OmegaConf

# Keys (and sections) a resume may change: they alter what is logged, saved or evaluated, or
# where the run executes, not the training problem. optim.epochs / optim.steps may change only
# as long as the schedule's length stays the same (a longer cosine would jump the lr mid-run).
RESUME_MAY_CHANGE = (
    "name", "output_dir", "optim.max_steps", "data.num_workers", "train.device", "train.deterministic",
    "train.log_every", "train.eval_every_epochs", "train.staleness_every_epochs", "train.checkpoint_every_epochs",
    "train.checkpoint_every_steps", "train.tensorboard", "train.progress", "train.on_nonfinite", "train.dist_timeout_s",
    "train.grad_cache_chunk", "eval",
)
# Where the training data live, not what they are: a resume may change these when the checkpoint's
# data fingerprint proves the data the same (moved data); the cache directory may always change.
# train.precision may change as long as the autocast dtype it resolves to stays the same.
DATA_LOCATION = ("data.options.path", "data.options.test_path")
ALWAYS_MAY_CHANGE = ("data.options.cache_dir", "train.precision")

def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat  # an empty section has no leaves: set-vs-unset shows up at the leaves
    return {prefix: _plain(value)}


def _plain(value):
    """Tuples as lists, recursively (a YAML round trip turns one into the other)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _show(value) -> str:
    return "unset" if value is _UNSET else json.dumps(value, default=str)


_UNSET = object()


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _saved_autocast(state: dict, saved: DictConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a checkpoint trained in: stored since plait records it; before, its
    ``train.precision`` resolved on its ``train.device`` (auto: assumed to be this machine's)."""
    names = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if state.get("precision") in names:
        return names[state["precision"]]
    precision, where = saved.train.precision, str(saved.train.device)
    if precision in names:
        return names[precision]
    kind = device.type if where == "auto" else ("cuda" if where.startswith("cuda") else where)
    return torch.bfloat16 if kind == "cuda" else None


def config_differences(saved: DictConfig, current: DictConfig, may_change=RESUME_MAY_CHANGE) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) of every setting that differs, leaving out the keys
    (and sections) in ``may_change``. A key set on one side only has the value ``_UNSET`` on the other."""
    old = _flat(OmegaConf.to_container(saved, resolve=True))
    new = _flat(OmegaConf.to_container(current, resolve=True))

    def allowed(key: str) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in may_change)

    keys = [*old, *(key for key in new if key not in old)]
    return [(key, old.get(key, _UNSET), new.get(key, _UNSET)) for key in keys
            if not allowed(key) and old.get(key, _UNSET) != new.get(key, _UNSET)]


def data_fingerprint(dataset, batch_size: int = 256) -> dict:
    """``{"size", "sha256"}`` of a dataset: its size and every item's views in order (tensor dtype,
    shape and bytes; caption text) and alternative captions, the same whatever ``batch_size``.
    About 0.04 s for emoji's 3,116 training items; the global random state is not touched."""
    import hashlib

    views = [hashlib.sha256(), hashlib.sha256()]
    kinds = ["", ""]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for _, *batch in loader:
        for side, view in enumerate(batch):
            if torch.is_tensor(view):
                kinds[side] = f"{view.dtype} {tuple(view.shape[1:])}"
                views[side].update(view.contiguous().numpy().tobytes())
            else:
                kinds[side] = "text"
                for text in view:
                    views[side].update(str(text).encode("utf-8") + b"\0")
    digest = hashlib.sha256(f"plait-data-1 {len(dataset)} {kinds[0]} {kinds[1]}".encode())
    digest.update(views[0].digest() + views[1].digest())
    alternatives = getattr(dataset, "alternatives", None)
    if alternatives:
        digest.update(json.dumps([list(a) for a in alternatives]).encode("utf-8"))
    return {"size": len(dataset), "sha256": digest.hexdigest()}
