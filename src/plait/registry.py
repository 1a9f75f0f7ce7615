"""One registry of named components (datasets, losses, regularisers, encoders, model kinds).

A :class:`Registry` maps case-insensitive names and aliases to classes (or builder functions),
and constructs them with their options checked against the constructor's signature, so a
config's typo fails with the valid names or options listed instead of a ``TypeError`` deep
inside a constructor::

    LOSSES = Registry("loss")

    @LOSSES.register("infonce", aliases=("clip",))
    class InfoNCELoss(nn.Module): ...

    LOSSES.alias("ntxent", "infonce", defaults={"mode": "unimodal"})
    LOSSES.build("NTXent", fill={"dataset_size": 1000}, temperature=0.2)

It is a read-only mapping of the canonical names (in registration order) to their objects;
``in``, ``[]`` and ``get`` also take aliases and any case.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any


class Registry(Mapping):
    """Named components of one kind: names (case-insensitive), aliases, and checked construction.

    ``internal`` names constructor parameters that builders pass themselves (through ``fill``),
    never options of a config: they are not listed as options and are refused as ones (the
    datasets' ``split``).
    """

    def __init__(self, kind: str, internal: Iterable[str] = ()):
        self.kind = kind
        self.internal = tuple(internal)
        self._objects: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        self._defaults: dict[str, dict] = {}
        self._renames: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj=None, *, aliases: Iterable[str] = (), defaults: dict | None = None,
                 rename: dict[str, str] | None = None):
        """Register ``obj`` under ``name`` (lower-cased) and ``aliases``; without ``obj``, a decorator.

        ``defaults`` are options applied first whenever ``name`` (or one of its aliases) is built;
        ``rename`` maps an option's name to the constructor parameter it fills (``{"path": "folder"}``).
        """
        if obj is None:
            def decorator(target):
                self.register(name, target, aliases=aliases, defaults=defaults, rename=rename)
                return target
            return decorator
        key = self._key(name)
        if key in self._objects or key in self._aliases:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._objects[key] = obj
        if defaults:
            self._defaults[key] = dict(defaults)
        if rename:
            self._renames[key] = dict(rename)
        for alias in aliases:
            self.alias(alias, key)
        return obj

    def alias(self, alias: str, name: str, *, defaults: dict | None = None) -> None:
        """Another name for the registered ``name``; its ``defaults`` apply over the name's own."""
        key, target = self._key(alias), self.resolve(name)
        if key in self._objects or key in self._aliases:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._aliases[key] = target
        if defaults:
            self._defaults[key] = dict(defaults)

    # ------------------------------------------------------------------ lookups
    @staticmethod
    def _key(name) -> str:
        return str(name).lower()

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        key = name.lower()
        return key in self._objects or key in self._aliases

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return self._objects[self.resolve(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {', '.join(self._objects)})"

    @property
    def aliases(self) -> Mapping[str, str]:
        """A read-only (live) view of alias -> canonical name."""
        return MappingProxyType(self._aliases)

    def names(self) -> list[str]:
        """Every name that resolves: the canonical ones and the aliases, sorted."""
        return sorted([*self._objects, *self._aliases])

    def resolve(self, name) -> str:
        """The canonical name of ``name`` (any case, or an alias); else a ValueError listing the valid names."""
        key = self._key(name)
        key = self._aliases.get(key, key)
        if key not in self._objects:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return key

    def get(self, name, default=None):
        """The registered object of ``name`` (any case, or an alias); ``default`` when there is none."""
        return self[name] if name in self else default

    def _parameters(self, key: str) -> tuple[list[str], bool]:
        """(constructor parameters without self, whether it takes ``**kwargs``)."""
        obj = self._objects[key]
        target = obj.__init__ if isinstance(obj, type) else obj
        parameters = list(inspect.signature(target).parameters.values())
        if isinstance(obj, type) and parameters:
            parameters = parameters[1:]  # self
        names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return names, any(p.kind is p.VAR_KEYWORD for p in parameters)

    def accepted(self, name) -> list[str]:
        """The options ``name`` takes, in signature order: its constructor's parameters (without self
        and the registry's internal ones), under their option names (see ``rename``)."""
        key = self.resolve(name)
        back = {parameter: option for option, parameter in self._renames.get(key, {}).items()}
        return [back.get(p, p) for p in self._parameters(key)[0] if p not in self.internal]

    # ------------------------------------------------------------------ construction
    def options(self, name, /, fill: dict | None = None, **options) -> dict:
        """The keyword arguments :meth:`build` passes to ``name``'s constructor (checked, renamed)."""
        key = self.resolve(name)
        written = self._key(name)
        merged = {**self._defaults.get(key, {}), **(self._defaults.get(written, {}) if written != key else {}), **options}
        accepted = self.accepted(key)
        parameters, var_keyword = self._parameters(key)
        unknown = sorted(set(merged) - set(accepted))
        if unknown and not (var_keyword and not set(unknown) & set(self.internal)):
            raise ValueError(f"{self.kind} {key!r} has no option {', '.join(map(repr, unknown))}; "
                             f"its options: {', '.join(accepted)}")
        for option, value in (fill or {}).items():
            if option in accepted or (option in self.internal and option in parameters):
                merged.setdefault(option, value)
        renames = self._renames.get(key, {})
        return {renames.get(option, option): value for option, value in merged.items()}

    def build(self, name, /, fill: dict | None = None, **options):
        """``name``'s object called with its registered defaults, then ``options`` (checked against
        its signature), and ``fill`` (values passed only where the constructor takes them, such
        as a dataset size or a seed; given options win)."""
        return self._objects[self.resolve(name)](**self.options(name, fill, **options))
