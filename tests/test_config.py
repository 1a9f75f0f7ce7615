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
    with pytest.raises(ValueError, match="packaged configs: emoji, gap, glyphs, tiny, uci"):
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
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


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
