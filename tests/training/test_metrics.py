"""The loss window's log line and metrics.jsonl's append, truncation and fresh start."""

import json
import math

import torch

from plait.training.metrics import LossWindow, MetricsLog, finite_or_none


def test_the_window_logs_the_mean_loss_of_its_steps_and_its_throughput():
    window = LossWindow()
    window.add(torch.tensor(1.0), 16)
    window.add(None, 16)  # a skipped step: samples, no loss
    window.add(torch.tensor(3.0), 16)
    record = window.record(step=3, epoch=0, terms={"base": torch.tensor(0.5)}, lr=0.1, logit_scale=14.0, world_size=1,
                           skipped_steps=1)
    assert record["loss"] == 2.0 and record["skipped_steps"] == 1 and record["base"] == 0.5
    assert record["samples_per_s"] > 0 and record["step"] == 3
    state = window.state_dict()
    assert state == {"window_losses": [1.0, 3.0], "window_samples": 48}
    again = LossWindow()
    again.load_state_dict(state)
    assert again.record(3, 0, {}, 0.1, 14.0, 1, None)["loss"] == 2.0
    window.reset()
    assert window.record(4, 0, {}, 0.1, 14.0, 1, None)["loss"] is None and "skipped_steps" not in window.record(4, 0, {}, 0, 1, 1,
                                                                                                                None)


def test_metrics_log_appends_strict_json_and_a_resume_truncates_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "run", is_main=True, tensorboard=False)
    for step in (1, 2, 3, 4):
        log.append({"step": step, "loss": float("nan") if step == 2 else step / 10})
    lines = log.path.read_text().splitlines()
    assert len(lines) == 4 == log.lines and json.loads(lines[1])["loss"] is None
    with open(log.path, "a") as handle:
        handle.write('{"step": 5, "lo')  # a torn line (killed mid-write)
    log.truncate(step=2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2] and log.lines == 2
    fresh = MetricsLog(tmp_path / "run", is_main=True, tensorboard=False, fresh=True)
    fresh.append({"step": 9})
    fresh.append({"step": 10})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [9, 10] and fresh.lines == 2


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, is_main=False, tensorboard=False)
    log.append({"step": 1})
    assert not log.path.exists() and log.lines == 0
    assert finite_or_none({"a": math.inf, "b": 1.0, "c": "x"}) == {"a": None, "b": 1.0, "c": "x"}
