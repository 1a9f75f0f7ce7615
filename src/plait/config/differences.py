"""The differences between two configs, key by key: what a resume or a rerun compares.

``config_differences(saved, current, may_change)`` lists every differing leaf with both values;
what may change is declared in the schema (``plait.config.schema``: ``RESUME_MAY_CHANGE``,
``NO_EFFECT``, ...), never kept as lists here.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from plait.config.schema import RESUME_MAY_CHANGE


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


def show(value) -> str:
    """A config value as JSON, or ``unset``."""
    return "unset" if value is UNSET else json.dumps(value, default=str)


UNSET = object()


def config_differences(saved: DictConfig, current: DictConfig, may_change=RESUME_MAY_CHANGE) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) of every setting that differs, leaving out the keys
    (and sections) in ``may_change``. A key set on one side only has the value ``UNSET`` on the other."""
    old = _flat(OmegaConf.to_container(saved, resolve=True))
    new = _flat(OmegaConf.to_container(current, resolve=True))

    def allowed(key: str) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in may_change)

    keys = [*old, *(key for key in new if key not in old)]
    return [(key, old.get(key, UNSET), new.get(key, UNSET)) for key in keys
            if not allowed(key) and old.get(key, UNSET) != new.get(key, UNSET)]
