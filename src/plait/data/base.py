"""The dataset interface every plait dataset follows, and helpers shared by them.

An item is ``(i, view_a, view_b)``: ``i`` is the item's index in the dataset (0..N-1, the key of
per-sample loss state), ``view_a`` a float32 image (3, H, W) in [0, 1] or a vector (d,),
``view_b`` a caption (str) or a vector (d,). ``DataLoader(dataset, batch_size=B)`` works as it
is: torch's default collate gives ``(LongTensor (B,), Tensor (B, ...), tuple[str] | Tensor (B, d))``;
``collate_fn=collate_pairs`` gives the captions as a list.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package {name!r} is not installed; this dataset reads its data files")
    return Path(next(iter(spec.submodule_search_locations)))


def check_split(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS` ("train", "test", "all"); a ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return split


class PairDataset(Dataset):
    """Base class: positive pairs (view_a, view_b) with the item index, labels and prompts.

    Attributes every subclass sets:

    - ``modalities``: ("image", "text") or ("vector", "vector").
    - ``labels``: label-set name -> int array (N,) of class ids (may be empty).
    - ``class_names``: the same keys -> human-readable class names (zero-shot prompts).
    - ``templates``: zero-shot prompt templates with ``{}``; empty for vector data.
    - ``texts``: the caption of each item (empty for vector data).
    - ``alternatives``: other valid captions of each item (lists may be empty).

    Subclasses implement ``__len__``, ``view_a(i)`` and ``view_b(i)``.
    """

    modalities: tuple[str, str] = ("vector", "vector")

    def __init__(self) -> None:
        self.labels: dict[str, np.ndarray] = {}
        self.class_names: dict[str, list[str]] = {}
        self.templates: list[str] = []
        self.texts: list[str] = []
        self.alternatives: list[list[str]] = []

    @property
    def groups(self):
        """(N,) group key of each item (items of one group stay on one side of a validation
        split), or None: every item is its own group."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def view_a(self, i: int):
        raise NotImplementedError

    def view_b(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i: int):
        i = int(i)
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} items")
        return i, self.view_a(i), self.view_b(i)

    def describe(self) -> dict:
        """A small JSON-able summary: size, modalities, label sets and their class counts."""
        return {
            "dataset": type(self).__name__,
            "size": len(self),
            "modalities": list(self.modalities),
            "labels": {name: len(self.class_names.get(name, [])) for name in self.labels},
        }


class VectorPairDataset(PairDataset):
    """Two float32 feature matrices held in memory, ``data_a`` (N, d_a) and ``data_b`` (N, d_b):
    ``view_a(i) = data_a[i]``, ``view_b(i) = data_b[i]``. Subclasses set both in ``__init__``."""

    modalities = ("vector", "vector")
    data_a: Tensor
    data_b: Tensor

    def __len__(self) -> int:
        return self.data_a.shape[0]

    def view_a(self, i: int) -> Tensor:
        return self.data_a[i]

    def view_b(self, i: int) -> Tensor:
        return self.data_b[i]


class ImagePairDataset(PairDataset):
    """Images held in memory as a uint8 tensor ``images`` (N, 3, S, S), captions in ``texts``.

    ``view_a(i)`` is ``images[i] / 255`` as float32; ``view_b(i)`` is ``texts[i]``.
    """

    modalities = ("image", "text")

    def __init__(self, images: Tensor, texts: list[str], alternatives: list[list[str]] | None = None):
        super().__init__()
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} captions")
        self.images = images
        self.texts = list(texts)
        self.alternatives = [list(a) for a in alternatives] if alternatives is not None else [[] for _ in texts]
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return self.images.shape[0]

    def view_a(self, i: int) -> Tensor:
        return self.images[i].float().div_(255.0)

    def view_b(self, i: int) -> str:
        return self.texts[i]


def stratified_split(labels: np.ndarray, test_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays with each class split in proportion.

    ``test_size`` is a count (int) or a fraction in (0, 1) (float). Each class gives
    ``test_size * n_class / N`` test items, rounded by largest remainder so the total is exact;
    which items go is a seeded permutation within the class.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if isinstance(test_size, float) and not isinstance(test_size, bool):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size as a fraction must be in (0, 1), got {test_size}")
        n_test = int(round(test_size * n))
    elif isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool):
        n_test = int(test_size)
    else:
        raise ValueError(f"test_size must be an int count or a float fraction, got {test_size!r}")
    if not 0 < n_test < n:
        raise ValueError(f"test_size must leave both splits non-empty: got {n_test} test items of {n}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / n
    take = np.floor(quota).astype(int)
    remainder = quota - take
    for c in np.argsort(-remainder, kind="stable")[: n_test - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    test = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        test.append(members[rng.permutation(members.shape[0])[:k]])
    test_index = np.sort(np.concatenate(test))
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_index] = False
    return np.flatnonzero(train_mask), test_index


def select_split(train: np.ndarray, test: np.ndarray, n: int, split: str) -> np.ndarray:
    """The item indices of ``split`` given the train and test index arrays."""
    if split == "train":
        return train
    if split == "test":
        return test
    return np.arange(n)


def collate_pairs(batch: list[tuple]) -> tuple[Tensor, Tensor, list[str] | Tensor]:
    """Batch items into ``(index (B,) int64, view_a (B, ...), view_b list[str] | (B, d))``.

    torch's default collate gives the same except that captions come as a tuple; pass
    ``collate_fn=collate_pairs`` to a DataLoader to get a list.
    """
    index = torch.tensor([int(item[0]) for item in batch], dtype=torch.long)
    view_a = torch.stack([item[1] for item in batch])
    second = [item[2] for item in batch]
    view_b = second if isinstance(second[0], str) else torch.stack(second)
    return index, view_a, view_b
