"""The validation split carved from a training split: groups stay together, items keep their data."""

import numpy as np
import pytest
import torch

from plait.data import SubsetPairDataset, carve_validation
from plait.data.base import VectorPairDataset


class _Grouped(VectorPairDataset):
    def __init__(self, n=40, group_size=4):
        super().__init__()
        self.data_a = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
        self.data_b = -self.data_a
        self.labels = {"parity": np.arange(n) % 2}
        self.class_names = {"parity": ["even", "odd"]}
        self.texts = [f"item {i}" for i in range(n)]
        self._groups = np.arange(n) // group_size
        self.dims = (3, 3)

    @property
    def groups(self):
        return self._groups


def test_groups_stay_on_one_side_and_items_keep_their_data():
    data = _Grouped()
    fit, validation = carve_validation(data, 0.2, seed=0)
    assert len(fit) + len(validation) == 40 and len(validation) == 8  # round(0.2 * 10 groups) = 2 groups of 4
    assert set(data.groups[fit.indices]).isdisjoint(data.groups[validation.indices])
    for subset in (fit, validation):
        for i, source in enumerate(subset.indices):
            index, a, b = subset[i]
            assert index == i  # re-indexed 0..n-1: the key of per-sample state
            assert torch.equal(a, data.data_a[source]) and torch.equal(b, data.data_b[source])
            assert subset.texts[i] == f"item {source}" and subset.labels["parity"][i] == source % 2
        assert subset.dims == (3, 3) and subset.class_names is data.class_names  # other attributes: the base's
    assert np.array_equal(fit.groups, data.groups[fit.indices])
    again_fit, again_validation = carve_validation(data, 0.2, seed=0)
    assert np.array_equal(again_validation.indices, validation.indices)
    assert not np.array_equal(carve_validation(data, 0.2, seed=1)[1].indices, validation.indices)


def test_without_groups_every_item_is_its_own_group_and_bad_fractions_are_refused():
    data = _Grouped()
    data._groups = None
    fit, validation = carve_validation(data, 0.1, seed=3)
    assert len(validation) == 4 and len(fit) == 36
    for fraction in (0.0, 1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="validation_fraction"):
            carve_validation(data, fraction, seed=0)
    with pytest.raises(ValueError, match="leaves an empty split"):
        carve_validation(_Grouped(n=8, group_size=4), 0.1, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        SubsetPairDataset(data, [1, 1, 2])


def test_emoji_validation_split_keeps_skin_tone_variants_together():
    from plait.data import EmojiDataset

    train = EmojiDataset(split="train")
    fit, validation = carve_validation(train, 0.1, seed=0)
    fit_bases = {train.bases[i] for i in fit.indices}
    assert fit_bases.isdisjoint(train.bases[i] for i in validation.indices)
    assert abs(len(validation) / len(train) - 0.1) < 0.03
