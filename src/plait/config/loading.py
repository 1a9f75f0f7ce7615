"""Reading configs: YAML files in ``configs/`` merged over the schema's typed defaults, dotted
overrides, and configs stored inside checkpoints and weights files (read as data).

``load_config("configs/emoji.yaml", ["loss.name=infonce", "data.batch_size=512"])``
returns an OmegaConf object; unknown keys and values of the wrong type raise a ValueError that
names the key. Free-form option blocks (``data.options``, ``model.a``, ``model.b``,
``loss.options``) accept any keys and are checked by the components they configure. What the
values may be, across sections, is :func:`plait.config.validate.validate`'s.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from plait.config.schema import RunConfig

PACKAGED = Path(__file__).parent.parent / "configs"

# Bounds on any YAML plait reads: nesting depth, and nodes after aliases are expanded (a config
# has a few hundred; a "billion laughs" file of nested aliases, x10 a level, would take minutes
# and gigabytes to build). Stored configs (plait never writes aliases) may hold no alias at all.
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 10_000


class _YamlLimit(ValueError):
    pass


def _bounded_loader(aliases: bool):
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader with a nesting bound, and aliases refused unless ``aliases``."""

        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                if not aliases:
                    event = self.peek_event()
                    raise _YamlLimit(f"line {event.start_mark.line + 1}: an alias (*{str(event.anchor)[:30]}); aliases are "
                                     "refused here (plait never writes them)")
                return super().compose_node(parent, index)
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    mark = self.peek_event().start_mark
                    raise _YamlLimit(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


def _expanded_nodes(node, limit: int) -> int:
    """The node count of a composed YAML document with every alias expanded (shared nodes counted
    each time they are reached), stopping past ``limit``; linear in the distinct nodes."""
    import yaml

    sizes: dict[int, int] = {}

    def size(item) -> int:
        key = id(item)
        if key in sizes:
            return sizes[key]
        total = 1
        if isinstance(item, yaml.SequenceNode):
            for child in item.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(item, yaml.MappingNode):
            for k, v in item.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        sizes[key] = total
        return total

    return size(node)


def safe_load_bounded(text: str, aliases: bool = True):
    """``yaml.safe_load`` with :data:`MAX_YAML_DEPTH` and :data:`MAX_YAML_NODES` (after alias
    expansion); ``aliases=False`` refuses any alias. A bound that is hit raises a ValueError
    (``yaml.YAMLError`` for syntax errors, as safe_load)."""
    loader = _bounded_loader(aliases)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise _YamlLimit(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (``emoji``, ``uci``, ``tiny``)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    raise ValueError(f"config file {path} does not exist (packaged configs: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Defaults <- YAML file <- ``key=value`` overrides; errors name the file (and line) or the
    override at fault, and the key."""
    config = OmegaConf.structured(RunConfig)
    if path is not None:
        path = resolve_config_path(path)
        config = _merge(config, _read_yaml(path), f"bad config in {path}")
    config = apply_overrides(config, overrides)
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"bad config{where}: {first_line(error)}") from None
    return config


def apply_overrides(config: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """``config`` with dotted ``key=value`` overrides merged in, one at a time, over its schema
    (a typed OmegaConf node: unknown keys and wrong types are refused); a ValueError names the
    override at fault and the key. Every command's overrides go through here.

    Example: ``apply_overrides(OmegaConf.structured(RunConfig), ["optim.lr=3e-4"])``."""
    import yaml

    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            safe_load_bounded(item.split("=", 1)[1], aliases=False)  # the value's depth and aliases, before OmegaConf parses it
        except _YamlLimit as error:
            raise ValueError(f"bad override {item[:80]!r}: {error}") from None
        except yaml.YAMLError:
            pass  # OmegaConf's own parse names the problem
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as error:
            raise ValueError(f"bad override {item!r}: {first_line(error)}") from None
        config = _merge(config, dotlist, f"bad override {item!r}")
    return config


def first_line(error: Exception) -> str:
    """An exception as one line (its first), with OmegaConf's key when it names one."""
    key = getattr(error, "full_key", None)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{text} (key {key})" if key and str(key) not in text else text


def _merge(config: DictConfig, other, context: str) -> DictConfig:
    try:
        return OmegaConf.merge(config, other)
    except (OmegaConfBaseException, TypeError) as error:  # TypeError: e.g. a list where a mapping belongs
        raise ValueError(f"{context}: {first_line(error)}") from None


def _read_yaml(path: Path) -> DictConfig:
    """A user's YAML file as an OmegaConf node; syntax errors name the file and line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not valid UTF-8 (byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        data = safe_load_bounded(text)  # its shape first (and bounds); OmegaConf's own dialect (1e-3 is a float) for the values
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections (data:, model:, ...), "
                             f"got {type(data).__name__}")
        node = OmegaConf.create(text) if data else OmegaConf.create({})
    except _YamlLimit as error:
        raise ValueError(f"config file {path} is refused: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML:{line} {problem}") from None
    except (OmegaConfBaseException, TypeError) as error:
        raise ValueError(f"bad config in {path}: {first_line(error)}") from None
    return node


def to_yaml(config: DictConfig) -> str:
    """The config as YAML text (what checkpoints, exported weights and run directories store)."""
    return OmegaConf.to_yaml(config)


# ------------------------------------------------------------------------------ stored configs
def load_stored_config(text: str, source: str = "stored config", allow_import: bool = False) -> DictConfig:
    """The config stored inside a checkpoint or an exported weights file, read as *data*.

    A file that users exchange must not run code or read the environment when loaded, so its
    config is parsed with YAML's safe loader, any interpolation (``${...}``, which could call a
    resolver such as ``oc.env``) is refused instead of resolved, the result is validated against
    the schema, and every component name (dataset, encoders, loss, regularisers) must be a
    registered one (:func:`check_components`; an import path only with ``allow_import``, which
    only the command line sets). Errors are one line naming ``source``.
    """
    import yaml

    if not isinstance(text, str):
        raise ValueError(f"{source}: the stored config is not text")
    if len(text) > 1 << 20:
        raise ValueError(f"{source}: the stored config is {len(text)} characters long (at most {1 << 20}); refused")
    try:
        data = safe_load_bounded(text, aliases=False)
    except _YamlLimit as error:
        raise ValueError(f"{source}: the stored config is refused: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{source}: the stored config is not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the stored config is not a mapping of sections")
    for key, value in _leaves(data):
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"{source}: stored config value {key} = {value[:60]!r} is an interpolation; "
                             "stored configs are data and are never resolved (refused)")
        if isinstance(key, str) and "${" in key:
            raise ValueError(f"{source}: stored config key {key[:60]!r} is an interpolation (refused)")
    try:
        config = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
    except (OmegaConfBaseException, TypeError) as error:
        raise ValueError(f"{source}: the stored config does not fit the schema: {first_line(error)}") from None
    check_components(config, source=source, allow_import=allow_import)
    return config


def _leaves(value, prefix: str = ""):
    """(dotted key, value) of every entry of nested dicts/lists, keys included as values."""
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            yield name, key
            yield from _leaves(item, name)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def check_components(config: DictConfig, source: str = "config", allow_import: bool = False) -> None:
    """Every component a config names is registered: the dataset, the loss, the regularisers and
    the encoders (an encoder ``package.module:Class`` only with ``allow_import``, which only the
    command line's ``--allow-import`` sets). Raises a ValueError naming the key."""
    from plait.data.registry import DATASETS
    from plait.losses.objective import MODEL_ITC
    from plait.losses.registry import LOSSES
    from plait.losses.regularizers import REGULARIZERS
    from plait.models import ENCODERS

    def check(key: str, name, registry, extra: tuple[str, ...] = ()) -> None:
        if not (name in registry or (isinstance(name, str) and name.lower() in extra)):
            valid = sorted([*registry.names(), *extra])
            raise ValueError(f"{source}: {key}={name!r} is not a registered name; valid: {', '.join(valid)}")

    check("data.name", config.data.name, DATASETS)
    check("loss.name", config.loss.name, LOSSES, extra=(MODEL_ITC,))
    for index, spec in enumerate(config.regularizers):
        check(f"regularizers[{index}].name", spec.get("name") if isinstance(spec, DictConfig) else None, REGULARIZERS)
    for side in ("a", "b"):
        spec = config.model[side]
        if not spec:
            continue
        name = spec.get("name")
        if allow_import and isinstance(name, str) and ":" in name:
            continue
        if isinstance(name, str) and ":" in name:
            raise ValueError(f"{source}: model.{side}.name={name!r} is an import path; importing code named in a "
                             "config needs --allow-import on the command line (never honoured from a file's contents)")
        check(f"model.{side}.name", name, ENCODERS)


def from_yaml(text: str, source: str = "stored config", allow_import: bool = False) -> DictConfig:
    """Alias of :func:`load_stored_config` (every YAML that plait reads back is a stored config)."""
    return load_stored_config(text, source, allow_import)
