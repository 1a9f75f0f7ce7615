import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.config import RunConfig, load_config, load_stored_config, resolve_config_path, to_yaml
from tests.fuzz_cases import count


def test_packaged_configs_load_and_overrides_apply():
    for name in ("emoji", "uci", "tiny", "glyphs"):
        config = load_config(name)
        assert config.data.name in ("emoji", "uci", "digits", "csv")
    assert load_config("glyphs").data.options.path == "runs/data/glyphs/pairs.csv"
    config = load_config("emoji", ["loss.name=infonce", "data.batch_size=512", "loss.options.estimator=memory"])
    assert config.name == "emoji-infonce-b512"  # interpolated after the overrides
    assert config.loss.options.estimator == "memory"


def test_errors_name_the_key_or_file(tmp_path):
    with pytest.raises(ValueError, match="batchsize"):
        load_config("tiny", ["data.batchsize=3"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_config("tiny", ["optim.lr=fast"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config("tiny", ["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        load_config(bad)
    from plait.config import PACKAGED

    packaged = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    assert {"emoji", "gap", "glyphs", "tiny", "uci"} <= set(packaged.split(", "))
    with pytest.raises(ValueError, match=f"packaged configs: {packaged}"):
        resolve_config_path("nope")


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data:\n  name: emoji\n  batch_size: [32\noptim: {lr: 1}\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML: line 4, column \d+") as caught:
        load_config(bad)
    assert "\n" not in str(caught.value)
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid UTF-8"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(bad)
    bad.write_text("")  # an empty file is the defaults
    assert load_config(bad).data.batch_size == RunConfig().data.batch_size


def test_an_override_error_names_the_override_not_the_file():
    with pytest.raises(ValueError, match=r"^bad override 'optim.lr=fast'") as caught:
        load_config("tiny", ["data.batch_size=8", "optim.lr=fast"])
    assert "tiny.yaml" not in str(caught.value)
    with pytest.raises(ValueError, match=r"bad override 'data.batch_size=\[1'"):
        load_config("tiny", ["data.batch_size=[1"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config("tiny", ["=3"])


def test_a_trained_config_round_trips_as_stored_config():
    config = load_config("emoji", ["loss.name=infonce"])
    assert load_stored_config(to_yaml(config)) == config


# ------------------------------------------------------------------------------ fuzzing
SCHEMA = {  # key -> a strategy of values the schema accepts, and its expected loaded value
    "data.batch_size": st.integers(2, 4096),
    "data.validation_fraction": st.floats(0, 0.9, allow_nan=False),
    "optim.lr": st.floats(1e-8, 10, allow_nan=False),
    "optim.epochs": st.integers(1, 1000),
    "train.log_every": st.integers(1, 1000),
    "train.deterministic": st.booleans(),
    "loss.name": st.sampled_from(["gamma", "infonce", "sogclr"]),
    "model.embed_dim": st.integers(1, 1024),
    "eval.tasks": st.lists(st.sampled_from(["retrieval", "knn"]), max_size=2),
}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _check(call, path_hint: str):
    """``call()`` returns a config or raises a one-line ValueError naming ``path_hint``; no
    other exception type escapes."""
    try:
        return call()
    except ValueError as error:
        assert path_hint in str(error) and "\n" not in str(error), str(error)
        return None


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(valid=st.fixed_dictionaries({}, optional=SCHEMA), junk=st.dictionaries(
    st.sampled_from(["data.batch_size", "optim.lr", "optim.epochz", "model.a", "train.device", "eval.few_shot", "name",
                     "seed", "nonsense", "data.options", "data.augment.image"]), JUNK, max_size=2))
def test_fuzz_config_files_load_exactly_or_fail_naming_the_file(valid, junk):
    """Random config files: valid entries load to exactly the values written; junk entries
    either load or are refused with one line naming the file."""
    count("config file")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(_nest(valid)))
        config = _check(lambda: load_config(path), "fuzz.yaml")
        assert config is not None, "a file of valid values must load"
        for key, value in valid.items():
            loaded = config
            for part in key.split("."):
                loaded = loaded[part]
            assert (list(loaded) if key == "eval.tasks" else loaded) == value, key
        path.write_text(yaml.safe_dump(_nest({**valid, **junk})))
        _check(lambda: load_config(path), "fuzz.yaml")


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_random_bytes_as_a_config_file(data):
    count("config bytes")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_bytes(data)
        _check(lambda: load_config(path), "random.yaml")


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.lists(st.text(st.characters(codec="utf-8"), max_size=30) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(["optim.lr", "data.batch_size", "model.a.name", "seed", "x.y", "eval.tasks"]),
    st.text(max_size=12)), max_size=3))
def test_fuzz_command_line_overrides(items):
    """Random overrides load or are refused naming the override (or its key=value form)."""
    count("override")
    try:
        load_config("tiny", items)
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and (message.startswith("bad override") or "not of the form key=value" in message
                                        or message.startswith("bad config")), message


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.text(max_size=300) | st.builds(lambda d: yaml.safe_dump(_nest(d)), st.dictionaries(
    st.sampled_from(["name", "model.a.name", "data.name", "loss.name", "optim.lr", "data.options.path", "regularizers"]),
    JUNK | st.sampled_from(["${oc.env:HOME}", "os:system", "emoji", "mlp", "${name}"]), max_size=3)))
def test_fuzz_stored_configs_are_validated_or_refused(text):
    """A stored config from a file either validates (and then names only registered components,
    with no interpolation left) or is refused in one line naming the file."""
    count("stored config")
    config = _check(lambda: load_stored_config(text, source="model.safetensors"), "model.safetensors")
    if config is not None:
        assert "${" not in to_yaml(config).replace("${name}", "")  # only the schema's own default remains
        assert ":" not in str(config.model.a.get("name", "")) and ":" not in str(config.model.b.get("name", ""))


def _laughs(levels: int, where: str = "data:\n  options:\n") -> str:
    """A "billion laughs" YAML: each level a list of 10 aliases of the one before (10**levels leaves)."""
    lines = ['    a0: &a0 ["lol"]']
    lines += [f"    a{n}: &a{n} [{', '.join(f'*a{n - 1}' for _ in range(10))}]" for n in range(1, levels + 1)]
    return where + "\n".join(lines) + "\n"


def test_alias_bombs_and_deep_nesting_are_refused_in_one_line_at_once(tmp_path):
    """Nested aliases (10**6 values at 6 levels: a minute and a gigabyte to build) and 3000 levels of
    nesting (a RecursionError) in a stored config, a config file and an override: one line, fast."""
    import time

    from plait.config import MAX_YAML_DEPTH, MAX_YAML_NODES

    deep = "data:\n  options:\n    x: " + "[" * 3000 + "]" * 3000 + "\n"
    start = time.perf_counter()
    for text, message in ((_laughs(6), "line 4: an alias (*a0); aliases are refused here (plait never writes them)"),
                          (_laughs(1), "line 4: an alias (*a0); aliases are refused here (plait never writes them)"),  # any
                          (deep, f"line 3: nested more than {MAX_YAML_DEPTH} levels deep")):
        with pytest.raises(ValueError) as caught:
            load_stored_config(text, source="model.safetensors")
        assert str(caught.value) == f"model.safetensors: the stored config is refused: {message}"
    path = tmp_path / "bomb.yaml"
    for text, message in ((_laughs(6), f"more than {MAX_YAML_NODES} values once its aliases are expanded"),
                          (deep, f"line 3: nested more than {MAX_YAML_DEPTH} levels deep")):
        path.write_text(text)
        with pytest.raises(ValueError) as caught:
            load_config(path)
        assert str(caught.value) == f"config file {path} is refused: {message}"
    with pytest.raises(ValueError,
                       match=rf"^bad override 'model.a=\[\[\[.*': line 1: nested more than {MAX_YAML_DEPTH} levels deep$"):
        load_config("tiny", ["model.a=" + "[" * 3000 + "]" * 3000])
    with pytest.raises(ValueError, match=r"^bad override 'seed=\*x': line 1: an alias"):
        load_config("tiny", ["seed=*x"])
    assert time.perf_counter() - start < 5
    # a user's own anchors within the bounds are YAML as usual
    path.write_text("model:\n  a: &tower {name: mlp, hidden: [64], out_dim: 32}\n  b: *tower\n")
    config = load_config(path)
    assert config.model.b.hidden == [64] and config.model.b.name == "mlp"


@settings(max_examples=120, deadline=None, derandomize=True)
@given(depth=st.integers(1, 45), flow=st.booleans(), where=st.sampled_from(["stored", "file", "override"]))
def test_fuzz_nesting_depth_is_bounded_exactly(depth, flow, where):
    """A value nested ``depth`` lists deep loads while the document is at most MAX_YAML_DEPTH levels
    (the mapping sections and the scalar count), and is refused in one line beyond."""
    from plait.config import MAX_YAML_DEPTH

    count("yaml depth")
    value = "[" * depth + "1" + "]" * depth
    if not flow:  # block style: "- - - 1"
        value = "\n" + "      " + "- " * depth + "1" if depth else "1"
    # the document's mappings (root, data, options), the lists, the scalar; an override's value alone: the lists and the scalar
    levels = {"stored": 3, "file": 3, "override": 0}[where] + depth + 1
    try:
        if where == "stored":
            loaded = load_stored_config(f"data:\n  options:\n    x: {value}\n", source="f").data.options.x
        elif where == "file":
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "c.yaml"
                path.write_text(f"data:\n  options:\n    x: {value}\n")
                loaded = load_config(path).data.options.x
        else:
            loaded = load_config(None, ["data.options.x=" + "[" * depth + "1" + "]" * depth]).data.options.x
    except ValueError as error:
        assert levels > MAX_YAML_DEPTH and f"nested more than {MAX_YAML_DEPTH} levels deep" in str(error), (levels, str(error))
        assert "\n" not in str(error)
        return
    assert levels <= MAX_YAML_DEPTH, levels
    for _ in range(depth):
        assert len(loaded) == 1
        loaded = loaded[0]
    assert loaded == 1
