import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from plait.data import ImagePairDataset, collate_pairs, stratified_split


def test_stratified_split_exact_total_proportional_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, test = stratified_split(labels, 20, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(100))
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=4), [10, 6, 3, 1])
    again, _ = stratified_split(labels, 20, seed=3)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(stratified_split(labels, 20, seed=4)[1], test)


def test_stratified_split_fraction_and_bad_sizes():
    labels = np.arange(10) % 2
    assert len(stratified_split(labels, 0.3, seed=0)[1]) == 3
    for bad in (0, 10, 1.5, 0.0, "3"):
        with pytest.raises(ValueError, match="test_size"):
            stratified_split(labels, bad, seed=0)


def test_image_pair_dataset_items_and_loaders():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = ImagePairDataset(images, [f"caption {k}" for k in range(5)])
    i, a, b = ds[2]
    assert i == 2 and b == "caption 2" and a.dtype == torch.float32
    torch.testing.assert_close(a, images[2].float() / 255)
    with pytest.raises(IndexError):
        ds[5]
    index, a, b = next(iter(DataLoader(ds, batch_size=4)))
    assert index.dtype == torch.long and a.shape == (4, 3, 4, 4) and list(b) == [f"caption {k}" for k in range(4)]
    index, a, b = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_pairs)))
    assert isinstance(b, list) and index.tolist() == [0, 1, 2, 3]


def test_image_pair_dataset_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        ImagePairDataset(torch.zeros(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="captions"):
        ImagePairDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a"])
