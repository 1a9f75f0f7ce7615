"""plait.train, kept one release as a deprecated re-export of plait.training."""

import importlib
import sys

import pytest


def test_the_old_module_warns_and_gives_the_same_objects():
    sys.modules.pop("plait.train", None)
    with pytest.warns(DeprecationWarning, match="import Trainer and train from plait.training"):
        old = importlib.import_module("plait.train")
    import plait.training
    from plait.losses.objective import build_objective

    assert old.Trainer is plait.training.Trainer and old.train is plait.training.train and old.build_objective is build_objective
