"""A subset of a pair dataset with its own 0..n-1 indices, and the validation split carved from training.

    fit, validation = carve_validation(train_set, fraction=0.1, seed=0)

The validation split is what learning rates and other settings are chosen on, so the test split is
never looked at while tuning. Items that share a group (``dataset.groups``, e.g. the skin-tone
variants of one base emoji) go to the same side, so near-duplicates do not leak across it.
"""

from __future__ import annotations

import numpy as np

from plait.data.base import PairDataset


class SubsetPairDataset(PairDataset):
    """``base`` restricted to ``indices`` (sorted, distinct): item i is ``base[indices[i]]``
    re-indexed as i (the key of per-sample loss state). Per-item attributes (labels, texts,
    alternatives, groups) are sliced; every other attribute is the base dataset's."""

    def __init__(self, base: PairDataset, indices, name: str = "subset"):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or indices.size == 0:
            raise ValueError(f"a {name} subset needs a non-empty 1-d index array, got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= len(base) or np.unique(indices).size != indices.size:
            raise ValueError(f"{name} subset indices must be distinct and in [0, {len(base)})")
        self.base, self.indices, self.name = base, indices, name
        self.modalities = base.modalities
        self.labels = {key: np.asarray(values)[indices] for key, values in base.labels.items()}
        self.class_names = base.class_names
        self.templates = base.templates
        self.texts = [base.texts[i] for i in indices] if base.texts else []
        self.alternatives = [base.alternatives[i] for i in indices] if base.alternatives else []

    def __getattr__(self, attribute: str):  # image_size, dims, ... of the base dataset
        if attribute in ("base", "indices", "name"):
            raise AttributeError(attribute)
        return getattr(self.base, attribute)

    @property
    def groups(self) -> np.ndarray | None:
        groups = self.base.groups
        return None if groups is None else np.asarray(groups)[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def view_a(self, i: int):
        return self.base.view_a(int(self.indices[i]))

    def view_b(self, i: int):
        return self.base.view_b(int(self.indices[i]))

    def __repr__(self) -> str:
        return f"SubsetPairDataset({self.name}, size={len(self)}, of {self.base!r})"


def carve_validation(dataset: PairDataset, fraction: float, seed: int) -> tuple[SubsetPairDataset, SubsetPairDataset]:
    """(fit, validation) subsets of ``dataset``: a seeded permutation of its groups (each item its
    own group when ``dataset.groups`` is None) sends ``round(fraction * n_groups)`` groups to
    validation. Both sides keep the dataset order."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {fraction!r}")
    n = len(dataset)
    groups = dataset.groups
    keys = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(keys.max()) + 1
    n_validation = int(round(fraction * n_groups))
    if not 0 < n_validation < n_groups:
        raise ValueError(f"data.validation_fraction={fraction} leaves an empty split ({n_groups} groups of items)")
    chosen = np.random.default_rng(seed).permutation(n_groups)[:n_validation]
    in_validation = np.isin(keys, chosen)
    return (SubsetPairDataset(dataset, np.flatnonzero(~in_validation), "fit"),
            SubsetPairDataset(dataset, np.flatnonzero(in_validation), "validation"))
