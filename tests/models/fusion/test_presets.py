"""plait.models.fusion.presets: the named sizes, their merge with overrides, and build_fusion_model."""

from __future__ import annotations

import inspect

import pytest

import plait.models.fusion as fusion
from plait.models.fusion import FusionModel
from plait.models.fusion.presets import PRESETS, build_fusion_model, preset_options


def test_every_preset_names_only_options_of_the_model():
    accepted = set(inspect.signature(FusionModel.__init__).parameters) - {"self"}
    assert set(PRESETS) == {"tiny", "small", "minilm", "base"}
    for name, options in PRESETS.items():
        assert set(options) <= accepted, name
        assert options.get("init", "random") == "random" or options["width"] == 384, name  # MiniLM's width


def test_preset_options_put_the_overrides_on_top_and_leave_the_table_alone():
    options = preset_options("tiny", queue_size=8, dropout=0.1)
    assert options == {**PRESETS["tiny"], "queue_size": 8, "dropout": 0.1}
    assert PRESETS["tiny"]["queue_size"] == 1024 and "dropout" not in PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown fusion preset 'huge'; valid: tiny, small, minilm, base"):
        preset_options("huge")


def test_the_model_preset_and_the_builder_agree():
    built = build_fusion_model({"kind": "fusion", "preset": "tiny", "queue_size": 8, "seed": 3})
    direct = FusionModel.preset("tiny", queue_size=8, seed=3)
    assert built.config == direct.config == FusionModel(**preset_options("tiny", queue_size=8, seed=3)).config
    assert build_fusion_model().config == FusionModel.preset("tiny").config  # no section: the tiny preset
    with pytest.raises(ValueError, match="unknown fusion preset"):
        FusionModel.preset("huge")
    with pytest.raises(ValueError, match="no option 'depth', 'layers'; its options: preset, alpha"):
        build_fusion_model({"preset": "tiny", "depth": 3, "layers": 2})


def test_the_package_exports_the_same_objects():
    assert fusion.PRESETS is PRESETS and fusion.build_fusion_model is build_fusion_model
    assert fusion.preset_options is preset_options
