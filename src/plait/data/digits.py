"""scikit-learn's handwritten digits (1,797 images of 8 x 8, 10 classes) with short captions.

The data ship with scikit-learn (``sklearn.datasets.load_digits``, no download). Pixels 0-16 are
scaled to [0, 1] and the grey channel is repeated to RGB; ``image_size`` other than 8 resizes
bilinearly. Each item's caption is one of ``CAPTIONS`` filled with its digit, chosen per item by
``seed`` (the same choice in every split); the other fillings are its ``alternatives``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from plait._checks import is_int
from plait.data.base import PairDataset, check_split, select_split, stratified_split
from plait.data.uci import DIGIT_NAMES

CAPTIONS = ["a handwritten {name}", "the digit {name}", "{digit}", "a drawing of the number {name}"]
TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "the number {}"]


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 (1797, 8, 8) in 0..16, labels int64 (1797,)) from scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


class DigitsDataset(PairDataset):
    """Digit images (3, S, S) in [0, 1] paired with captions such as "the digit seven".

    ``split``: "train", "test" or "all"; ``test_size`` (fraction or count) of the digits,
    stratified by class and chosen by ``seed``, form the test split. Labels: ``digit``.
    """

    modalities = ("image", "text")

    def __init__(self, split: str = "train", image_size: int = 8, seed: int = 0, test_size: int | float = 0.2):
        super().__init__()
        check_split(split)
        if not (is_int(image_size) and image_size >= 1):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        images, labels = load_digits_arrays()
        train, test = stratified_split(labels, test_size, seed)
        index = select_split(train, test, labels.shape[0], split)
        grey = torch.from_numpy(images[index] / 16.0).float().unsqueeze(1)  # (N, 1, 8, 8)
        if image_size != grey.shape[-1]:
            grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
        self.grey = grey.contiguous()
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.source_index = index
        choice = np.random.default_rng(seed).integers(len(CAPTIONS), size=labels.shape[0])
        self.texts, self.alternatives = [], []
        for k in index:
            digit = int(labels[k])
            fillings = [c.format(name=DIGIT_NAMES[digit], digit=digit) for c in CAPTIONS]
            self.texts.append(fillings[choice[k]])
            self.alternatives.append([f for n, f in enumerate(fillings) if n != choice[k]])
        self.labels = {"digit": labels[index].copy()}
        self.class_names = {"digit": list(DIGIT_NAMES)}
        self.templates = list(TEMPLATES)

    def __len__(self) -> int:
        return self.grey.shape[0]

    def view_a(self, i: int) -> Tensor:
        return self.grey[i].expand(3, -1, -1).clone()

    def view_b(self, i: int) -> str:
        return self.texts[i]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, size={len(self)}, image_size={self.image_size})"
