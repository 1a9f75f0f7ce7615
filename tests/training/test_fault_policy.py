"""The fault policy on its own: stop names the step and the items; skip counts, then stops."""

import pytest
import torch
from torch import nn

from plait.training.faults import MAX_CONSECUTIVE_SKIPS, FaultPolicy, degenerate_features, nonfinite_tensor
from plait.types import PairFeatures


def test_stop_raises_naming_the_step_the_batch_and_the_last_checkpoint():
    policy = FaultPolicy(skip=False, is_main=True)
    with pytest.raises(ValueError) as caught:
        policy.decide("non-finite loss", torch.arange(10), (7, 1, 3), nn.Linear(2, 2), "the last good checkpoint is c (step 4)",
                      True, on_skip=lambda: None)
    message = str(caught.value)
    assert message.startswith("training stopped at step 7: non-finite loss (epoch 1, batch 3 of the epoch; training-set "
                              "indices 0, 1, 2, 3, 4, 5, 6, 7, ... (10 items))")
    assert "the last good checkpoint is c (step 4)" in message and "--resume" in message


def test_skip_counts_and_stops_after_the_limit_or_at_once_for_broken_parameters(capsys):
    policy = FaultPolicy(skip=True, is_main=True)
    skipped = []
    for _ in range(MAX_CONSECUTIVE_SKIPS - 1):
        policy.decide("bad", torch.arange(2), (1, 0, 1), nn.Linear(2, 2), "no checkpoint", False,
                      on_skip=lambda: skipped.append(1))
    assert len(skipped) == policy.skipped_steps == policy.consecutive_skips == MAX_CONSECUTIVE_SKIPS - 1
    assert "train.on_nonfinite=skip" in capsys.readouterr().err
    policy.step_taken()
    assert policy.consecutive_skips == 0 and policy.skipped_steps == MAX_CONSECUTIVE_SKIPS - 1
    broken = nn.Linear(2, 2)
    with torch.no_grad():
        broken.bias[0] = float("inf")
    assert nonfinite_tensor(nn.Linear(2, 2), broken) == "bias"
    with pytest.raises(ValueError, match=r"parameters are no longer finite \(bias\)"):
        policy.decide("bad", torch.arange(2), (9, 0, 9), broken, "no checkpoint", False, on_skip=lambda: None)


def test_degenerate_features_names_the_items_with_no_direction():
    a = torch.randn(4, 3)
    a[2] = 0.0
    features = PairFeatures(a, torch.randn(4, 3), index=torch.tensor([10, 11, 12, 13]))
    assert degenerate_features(features, torch.arange(4)) == "all-zero features (a) of item(s) 12"
    assert degenerate_features(PairFeatures(torch.ones(4, 3), torch.ones(4, 3)), torch.arange(4)) is None
