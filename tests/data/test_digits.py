import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from plait.data import DigitsDataset


def test_matches_sklearn_arrays_and_labels():
    reference = load_digits()
    ds = DigitsDataset("all", image_size=8)
    assert len(ds) == 1797 and ds.modalities == ("image", "text")
    for i in range(len(ds)):
        index, image, caption = ds[i]
        assert index == i and caption == ds.texts[i]
    for i in (0, 100, 1796):
        image = ds[i][1]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        for channel in range(3):
            np.testing.assert_allclose(image[channel].numpy(), reference.images[i] / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.labels["digit"], reference.target)
    assert ds.class_names["digit"][7] == "seven"
    assert ds.templates and all("{}" in t for t in ds.templates)


def test_captions_name_the_digit_and_are_seeded():
    ds = DigitsDataset("all", seed=0)
    names = ds.class_names["digit"]
    for caption, alternatives, label in zip(ds.texts, ds.alternatives, ds.labels["digit"]):
        assert names[label] in caption or caption == str(label)
        assert caption not in alternatives and len(alternatives) == 3
    assert len(set(ds.texts)) > 10
    assert DigitsDataset("all", seed=0).texts == ds.texts
    assert DigitsDataset("all", seed=1).texts != ds.texts


def test_resize_and_splits():
    big = DigitsDataset("train", image_size=32)
    image = big[0][1]
    assert image.shape == (3, 32, 32) and 0.0 <= image.min() and image.max() <= 1.0
    test = DigitsDataset("test", image_size=32)
    assert len(big) + len(test) == 1797 and len(test) == 359
    assert set(big.source_index).isdisjoint(test.source_index)
    everything = DigitsDataset("all")
    np.testing.assert_array_equal(test.labels["digit"], everything.labels["digit"][test.source_index])
    assert [everything.texts[k] for k in test.source_index] == test.texts
    index, images, captions = next(iter(DataLoader(test, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataset(image_size=0)
