"""A synthetic two-modality dataset whose information gap is set by construction (E3).

The label y in [0, 2^k) is k fair bits, k = shared + private_a + private_b. Modality a sees the
shared bits and its own private bits, modality b the shared bits and its own::

    x_a = Q_a [ s(b_shared); s(b_private_a); g_a ] + noise * eps_a        s(b) = 2b - 1 (+-1)
    x_b = Q_b [ s(b_shared); s(b_private_b); g_b ] + noise * eps_b

with g ~ N(0, I_nuisance) uninformative coordinates and Q a fixed random rotation per modality.
With small noise, I(X_a; Y) = (shared + private_a) bits and I(X_b; Y) = (shared + private_b) bits,
so the gap Delta = |I(X_a; Y) - I(X_b; Y)| = |private_a - private_b| * ln 2 nats. A representation
that aligns the two modalities perfectly keeps only the shared bits: its best downstream
cross-entropy is at least (private_a + private_b) * ln 2 above that of the raw pair (CVPR 2023,
Theorem 3.1, where private_b = 0 gives exactly Delta).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from plait.data.base import VectorPairDataset, check_split, select_split, stratified_split


class InformationGapDataset(VectorPairDataset):
    """``(i, x_a (d_a,), x_b (d_b,))`` float32, label set ``y`` with 2^k classes."""


    def __init__(self, shared: int = 2, private_a: int = 2, private_b: int = 0, nuisance: int = 8,
                 noise: float = 0.3, size: int = 4000, split: str = "train", test_size: int | float = 1000, seed: int = 0):
        super().__init__()
        check_split(split)
        bits = shared + private_a + private_b
        if min(shared, private_a, private_b, nuisance) < 0 or not 1 <= bits <= 10:
            raise ValueError(f"need non-negative bit counts with 1 <= shared + private_a + private_b <= 10, "
                             f"got {shared}, {private_a}, {private_b}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.shared, self.private_a, self.private_b = shared, private_a, private_b
        self.gap_nats = abs(private_a - private_b) * math.log(2)
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2**bits, size=size)
        signs = 2.0 * ((y[:, None] >> np.arange(bits)[None, :]) & 1) - 1.0  # (size, bits), bit k of y
        parts_a = [signs[:, :shared], signs[:, shared:shared + private_a], rng.standard_normal((size, nuisance))]
        parts_b = [signs[:, :shared], signs[:, shared + private_a:], rng.standard_normal((size, nuisance))]
        arrays = []
        for parts in (parts_a, parts_b):
            latent = np.concatenate(parts, axis=1)
            rotation, _ = np.linalg.qr(rng.standard_normal((latent.shape[1], latent.shape[1])))
            arrays.append(latent @ rotation.T + noise * rng.standard_normal(latent.shape))
        train, test = stratified_split(y, test_size, seed) if 2**bits * 2 <= size else _plain_split(size, test_size, rng)
        index = select_split(train, test, size, split)
        self.split = split
        self.source_index = index
        self.data_a, self.data_b = (torch.from_numpy(x[index].astype(np.float32)) for x in arrays)
        self.labels = {"y": y[index].copy()}
        self.class_names = {"y": [format(c, f"0{bits}b") for c in range(2**bits)]}


def _plain_split(size: int, test_size: int | float, rng) -> tuple[np.ndarray, np.ndarray]:
    count = int(round(test_size * size)) if isinstance(test_size, float) else int(test_size)
    order = rng.permutation(size)
    return np.sort(order[count:]), np.sort(order[:count])
