"""Input checks and small kernels shared by the evaluation metrics.

Similarities are cosine similarities of rows normalised in float32, multiplied in float64 and
rounded to float32: the rounding makes a score independent of how the matrix product was blocked,
so chunked and full computations (and duplicated features) give bit-identical scores and
therefore identical ranks. Rankings use one total order everywhere: score descending, then index
ascending.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plait._checks import integer_vector, is_int


def as_features(features: Tensor, name: str) -> Tensor:
    """Check a (N, d) floating-point tensor with finite entries; return it in float32."""
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape (n, dim), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(features.shape)}")
    features = features.detach().to(torch.float32)
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def as_labels(labels: Tensor, name: str, length: int, device: torch.device) -> Tensor:
    """Check an integer tensor of shape (length,); return it as int64 on ``device``."""
    return integer_vector(labels, name, length, device).detach()


def same_dim_and_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has dim {a.shape[1]} but {name_b} has dim {b.shape[1]}; they must match")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


AUTO_CHUNK_SCORES = 2**22


def check_chunk_size(chunk_size: int | None, total: int, gallery: int) -> int:
    """Query rows per chunk of a (rows, gallery) score matrix.

    ``None`` picks the rows automatically: all of them when the whole matrix has at most 2^22
    scores, else as many as fit in 2^22 (results never depend on the chunking).
    """
    if chunk_size is None:
        return max(1, min(total, AUTO_CHUNK_SCORES // max(gallery, 1)))
    if not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def check_ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(not (is_int(k) and k >= 1) for k in ks):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {ks!r}")
    return ks


def unit_rows(features: Tensor) -> Tensor:
    """L2-normalised rows (in float32), held in float64 for :func:`cosine_scores` (float32 on MPS)."""
    rows = F.normalize(features, dim=1)
    return rows if rows.device.type == "mps" else rows.double()


def cosine_scores(queries: Tensor, gallery: Tensor) -> Tensor:
    """(Q, G) cosine similarities of :func:`unit_rows` outputs: float64 products rounded to float32."""
    return (queries @ gallery.T).float()


def rank_of(scores: Tensor, target: Tensor) -> Tensor:
    """1-based rank of column ``target[q]`` in row q under the order (score desc, index asc).

    rank = 1 + #{j : s_j > s_t} + #{j < t : s_j == s_t}: the position in a stable descending sort.
    Shapes: ``scores`` (Q, G), ``target`` (Q,) -> (Q,) int64.
    """
    target_score = scores.gather(1, target[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)
    greater = (scores > target_score).sum(1)
    ties_before = ((scores == target_score) & (columns[None, :] < target[:, None])).sum(1)
    return 1 + greater + ties_before


def best_positive(scores: Tensor, positive: Tensor) -> Tensor:
    """Column of the first positive under the order (score desc, index asc); every row needs one.

    Its rank is the smallest rank among the row's positives. Shapes: (Q, G), (Q, G) bool -> (Q,).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    columns = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return columns.masked_fill(~(positive & (scores == best)), scores.shape[1]).amin(1)


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best columns per row, ordered by (score desc, index asc)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def mean_per_class_recall(correct: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their items that are correct.

    scikit-learn's ``balanced_accuracy_score`` (CLIP_benchmark's ``mean_per_class_recall``).
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    hits = torch.zeros(len(classes), dtype=torch.float64, device=labels.device)
    totals = torch.zeros(len(classes), dtype=torch.float64, device=labels.device)
    hits.index_add_(0, inverse, correct.to(torch.float64))
    totals.index_add_(0, inverse, torch.ones_like(hits[inverse]))
    return float((hits / totals).mean())
