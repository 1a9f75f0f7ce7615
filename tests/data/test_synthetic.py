import math

import numpy as np
import pytest
import torch

from plait.data import InformationGapDataset, build_dataset
from plait.evaluate import linear_probe


@pytest.mark.parametrize("private_a", [0, 2])
def test_each_modality_carries_the_bits_it_is_given(private_a):
    """A linear probe on x_b recovers only the shared bits: accuracy ~ 2^-private_a; x_a and the
    pair recover all 4 bits."""
    options = {"shared": 4 - private_a, "private_a": private_a, "noise": 0.2}
    train, test = build_dataset("gap", "train", **options), build_dataset("gap", "test", **options)
    assert (len(train), len(test)) == (3000, 1000)
    y, y_test = torch.as_tensor(train.labels["y"]), torch.as_tensor(test.labels["y"])
    assert train.gap_nats == pytest.approx(private_a * math.log(2))
    on_a = linear_probe(train.data_a, y, test.data_a, y_test, C=1.0)["acc1"]
    on_b = linear_probe(train.data_b, y, test.data_b, y_test, C=1.0)["acc1"]
    assert on_a > 0.97
    assert on_b == pytest.approx(2.0 ** -private_a, abs=0.05)


def test_bits_are_the_label_and_splits_are_disjoint():
    all_items = InformationGapDataset(shared=1, private_a=1, private_b=1, split="all", size=400, test_size=100)
    assert len(all_items) == 400 and set(np.unique(all_items.labels["y"])) <= set(range(8))
    train = InformationGapDataset(shared=1, private_a=1, private_b=1, split="train", size=400, test_size=100)
    test = InformationGapDataset(shared=1, private_a=1, private_b=1, split="test", size=400, test_size=100)
    assert set(train.source_index.tolist()).isdisjoint(test.source_index.tolist())
    assert all_items.class_names["y"][5] == "101"
    with pytest.raises(ValueError, match="bit counts"):
        InformationGapDataset(shared=-1)
