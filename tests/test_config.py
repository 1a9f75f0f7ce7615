import pytest

from plait.config import load_config, resolve_config_path


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
