"""Minibatch InfoNCE: the CLIP loss (bimodal) and NT-Xent (unimodal)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from plait.losses._inputs import check_index, check_mode, check_temperature, prepare_pair, resolve_scale
from plait.losses._logsumexp import CHUNK_ROWS, check_chunk_size, pair_logsumexp, use_chunks
from plait.losses.base import ContrastiveLoss


class InfoNCELoss(ContrastiveLoss):
    """Minibatch InfoNCE, the loss whose small-batch gradient bias plait removes.

    With s_ij = scale * <a_i, b_j> (a, b L2-normalised unless ``normalize=False``;
    scale = ``logit_scale`` or 1/``temperature``):

    - ``mode="bimodal"`` (CLIP, Radford et al. 2021; open_clip's ``ClipLoss``)::

        L = 1/2 [ mean_i -log softmax_j(s_ij)[i] + mean_j -log softmax_i(s_ij)[j] ]

    - ``mode="unimodal"`` (NT-Xent, SimCLR, Chen et al. 2020): the 2B views z = [a; b] are all
      anchors; each contrasts its partner against the other 2B - 2 views::

        L = mean_p -log( exp(s_{p,p+}) / sum_{q != p} exp(s_pq) )

    A batch of one pair is allowed: the softmax runs over a single candidate, so L = 0 with a zero
    gradient (as open_clip and pytorch-metric-learning give).

    ``chunk_size``: the log-sum-exps are computed from the features ``chunk_size`` rows of s at a
    time (``plait.losses._logsumexp.pair_logsumexp``): memory O(B * chunk_size) instead of the
    (B, B) matrix (unimodal: (2B, 2B)), the same value and gradient up to float rounding, and on
    CPU faster than the dense formula past a few hundred rows (benchmarks/loss_speed.py).
    Matrices of at most 256 rows (``DENSE_ROWS``; B <= 256 bimodal, B <= 128 unimodal), where
    plain autograd ops are as fast or faster, and ``chunk_size=None`` use the dense formula
    (cross-entropy over the materialised s).

    Shapes: ``features_a``, ``features_b`` (B, d); returns a scalar.
    """

    def __init__(self, temperature: float = 0.07, mode: str = "bimodal", normalize: bool = True,
                 chunk_size: int | None = CHUNK_ROWS):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.mode = check_mode(mode)
        self.normalize = normalize
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self,
        features_a: Tensor,
        features_b: Tensor,
        logit_scale: Tensor | float | None = None,
        *,
        index: Tensor | None = None,
    ) -> Tensor:
        """Called as open_clip's ``ClipLoss(image_features, text_features, logit_scale)``.

        ``logit_scale``: the scale itself (already exponentiated), a number or a scalar tensor;
        None uses 1/temperature. ``index`` (B,), keyword-only: the rows' dataset indices, accepted
        for a common interface with the stateful losses; it is checked (integer, shape (B,), >= 0)
        and otherwise ignored.
        """
        a, b = prepare_pair(features_a, features_b, self.normalize, min_batch=1)
        if index is not None:
            check_index(index, a.shape[0], None, a.device)
        scale = resolve_scale(logit_scale, self.temperature, a)
        n_rows = a.shape[0] if self.mode == "bimodal" else 2 * a.shape[0]
        if use_chunks(n_rows, self.chunk_size):
            return _chunked(a, b, scale, self.mode, self.chunk_size)
        return _dense(a, b, scale, self.mode)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, mode={self.mode!r}, normalize={self.normalize}, "
                f"chunk_size={self.chunk_size}")


def _dense(a: Tensor, b: Tensor, scale: Tensor, mode: str) -> Tensor:
    """InfoNCE as cross-entropy over the materialised logits s: (B, B) bimodal, (2B, 2B) unimodal."""
    batch = a.shape[0]
    if mode == "bimodal":
        logits = scale * (a @ b.T)
        labels = torch.arange(batch, device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    views = torch.cat([a, b])
    logits = scale * (views @ views.T)
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=a.device), float("-inf"))
    partner = torch.arange(2 * batch, device=a.device).roll(batch)
    return F.cross_entropy(logits, partner)


def _chunked(a: Tensor, b: Tensor, scale: Tensor, mode: str, chunk_size: int) -> Tensor:
    """InfoNCE from the row (and column) log-sum-exps of s, computed block by block:
    L = mean_r (log sum_c exp(s_rc) - s_r,positive), over both directions (bimodal) or the 2B
    views with s_pp removed (unimodal); the positives' logits are picked by the same kernel."""
    if mode == "bimodal":
        rows, columns, positive = pair_logsumexp(a, b, scale, chunk_size=chunk_size, picks="diagonal")
        return ((rows - positive).mean() + (columns - positive).mean()) / 2
    views = torch.cat([a, b])
    every = torch.arange(views.shape[0], device=a.device)
    removed = (every, every, views.new_full((views.shape[0],), -math.inf))
    partner = every.roll(a.shape[0])
    rows, _, positive = pair_logsumexp(views, views, scale, removed, columns=False, chunk_size=chunk_size,
                                       picks=(every, partner))
    return (rows - positive).mean()
