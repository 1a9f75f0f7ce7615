"""Building a run: the same config builds the same run; its parts are the Trainer's attributes."""

import torch

from plait.config import load_config
from plait.training import RunParts, build_run
from plait.training.build import schedule_length


def test_a_config_always_builds_the_same_model_and_data_order(tmp_path):
    config = load_config("tiny", [f"output_dir={tmp_path}"])
    first, second = build_run(config), build_run(config)
    assert isinstance(first, RunParts)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert list(first.sampler) == list(second.sampler)
    assert first.total_steps == 6 and first.schedule_steps == schedule_length(config, first.steps_per_epoch)
    assert first.steps_per_epoch == len(first.train_set) // 16


def test_the_schedule_spans_optim_steps_or_the_epochs():
    config = load_config("tiny", ["optim.epochs=3"])
    assert schedule_length(config, 10) == 30
    config = load_config("tiny", ["optim.epochs=3", "optim.steps=7"])
    assert schedule_length(config, 10) == 7
