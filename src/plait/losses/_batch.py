"""The similarity matrix of one batch and its weighted partition sums, duplicates included.

Anchors come in two directions, stacked as rows of a (2, B) result: direction 0 anchors the
``a`` views, direction 1 the ``b`` views.

- bimodal: anchor a_r's candidates are the b_c (and vice versa); s = scale * a @ b.T, (B, B).
- unimodal (NT-Xent): anchor v_p's candidates are all 2B views [a; b] but itself;
  s = scale * v @ v.T, (2B, 2B).

A candidate that carries the anchor's dataset index is a *positive* (the partner view; with
duplicate indices in a batch there can be several); the anchor itself, and in unimodal mode any
same-modality duplicate of it, is not a candidate at all; every other candidate is a *negative*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plait.losses._logsumexp import pair_logsumexp, weighted_logsumexp


class PairBatch:
    """One batch's anchors and candidates: the similarity matrix (or the features it is made of),
    the positives' logits and the dataset indices.

    ``logits`` (B, B) bimodal or (2B, 2B) unimodal, the scaled similarities with gradient;
    ``positive`` (2, B) the logit of each anchor's own pair; ``index`` (B,) the dataset indices,
    ``unique`` (U,) the sorted distinct ones and ``inverse`` (B,) each row's position in ``unique``;
    ``column_logits`` (bimodal only): the logits direction 1 reads (default: ``logits``).

    A batch built with a ``chunk_size`` keeps the features (a, b, scale) instead and computes
    ``log_partition`` from them without forming the matrix: block by block (``pair_logsumexp``,
    ``means=True`` included) when negatives are weighted, from the same-index pairs alone
    (O(B + duplicates) logits) for a positives-only partition; ``negative_counts`` from the
    index. ``one_side`` gives such a batch whose logits carry gradient to one side only.
    """

    def __init__(self, logits: Tensor | None, positive: Tensor | None, index: Tensor, mode: str, unique: Tensor,
                 inverse: Tensor, column_logits: Tensor | None = None,
                 features: tuple[Tensor, Tensor, Tensor] | None = None, chunk_size: int | None = None,
                 side: str | None = None):
        self._logits, self._positive = logits, positive
        self.index, self.mode, self.unique, self.inverse = index, mode, unique, inverse
        self.column_logits = column_logits
        self.features = features
        self.chunk_size = chunk_size
        self.side = side  # a chunked batch's gradient routing: None (full), "anchor" or "candidate"

    @classmethod
    def build(cls, a: Tensor, b: Tensor, scale: Tensor, index: Tensor, mode: str,
              chunk_size: int | None = None) -> "PairBatch":
        """The batch of features a, b (B, d); ``chunk_size`` None builds the logits now, an int
        defers them to blocks of that many rows."""
        unique, inverse = torch.unique(index, return_inverse=True)
        if unique.numel() < 2:
            raise ValueError(
                "the batch holds a single distinct dataset index; a contrastive loss needs at "
                "least two different items in a batch"
            )
        if chunk_size is not None:  # the positives come with the first log_partition
            return cls(None, None, index, mode, unique, inverse, features=(a, b, scale), chunk_size=chunk_size)
        logits = _logits(a, b, scale, mode)
        return cls(logits, _positive(a, b, scale), index, mode, unique, inverse, features=(a, b, scale))

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            if self.side is not None:
                raise RuntimeError("a one-sided chunked batch has no logits; it computes log_partition(0, w) only")
            self._logits = _logits(*self.features, self.mode)
        return self._logits

    @property
    def chunked(self) -> bool:
        """Whether this batch computes from the features, never forming the logits."""
        return self._logits is None and self.chunk_size is not None

    @property
    def positive(self) -> Tensor:
        """(2, B) the logit of each anchor's own pair (a chunked batch: picked by its first
        ``log_partition``'s kernel if that comes first)."""
        if self._positive is None:
            self._positive = _positive(*self.features)
        return self._positive

    def with_logits(self, rows: Tensor, columns: Tensor | None = None) -> "PairBatch":
        """The same batch with other logits: direction 0 reads ``rows``; in bimodal mode
        direction 1 (the anchors b_c, columns) reads ``columns`` if given."""
        return PairBatch(rows, self.positive, self.index, self.mode, self.unique, self.inverse, columns)

    def one_side(self, anchor: bool) -> "PairBatch":
        """A chunked batch's negatives-only partitions with gradient to one side of each logit:
        the anchor's (and the scale) if ``anchor``, else the candidate's (as the dense batch
        ``with_logits`` of one-sided logits); the positives are this batch's."""
        if not self.chunked:
            raise ValueError("one_side needs a chunked batch (built with a chunk_size)")
        return PairBatch(None, self.positive, self.index, self.mode, self.unique, self.inverse,
                         features=self.features, chunk_size=self.chunk_size, side="anchor" if anchor else "candidate")

    @property
    def size(self) -> int:
        return self.index.shape[0]

    @property
    def has_duplicates(self) -> bool:
        return self.unique.numel() < self.size

    def negative_counts(self) -> Tensor:
        """(2, B) number of in-batch negatives of each anchor."""
        if self.chunked:  # from the index: B - (rows sharing the anchor's index), twice that unimodal
            counts = torch.bincount(self.inverse)[self.inverse]
            negatives = self.size - counts if self.mode == "bimodal" else 2 * (self.size - counts)
            return negatives.to(self.features[0].dtype).expand(2, -1).clone()
        if not self.has_duplicates:
            count = self.size - 1 if self.mode == "bimodal" else 2 * self.size - 2
            return self.logits.new_full((2, self.size), float(count))
        return self._masks()[2].sum(dim=-1).to(self.logits.dtype).reshape(2, -1)

    def log_partition(self, positive_weight: float, negative_weight: float, means: bool = False):
        """(2, B) log of  positive_weight * mean_{c pos} exp(s_rc) + negative_weight * mean_{c neg} exp(s_rc).

        A weight of 0 drops that group. Differentiable in ``logits``. ``means=True`` returns
        (log partition, mean logit) where the mean logit sum_c p_rc s_rc under the weighted
        softmax p is detached: d log partition / d log(scale).
        """
        log_pw = math.log(positive_weight) if positive_weight > 0 else -math.inf
        log_nw = math.log(negative_weight) if negative_weight > 0 else -math.inf
        if self.chunked and log_nw > -math.inf:
            return self._log_partition_chunked(log_pw, log_nw, means)
        if self.side is not None:
            raise ValueError("a one-sided batch computes negatives-weighted partitions only")
        if self.chunked and self.has_duplicates:
            return self._log_partition_positives(log_pw, means)
        if not self.has_duplicates:
            return self._log_partition_distinct(log_pw, log_nw, means)
        anchor_rows, positive, negative = self._masks()
        n_pos = positive.sum(dim=-1, keepdim=True).clamp(min=1).to(self.logits.dtype)
        n_neg = negative.sum(dim=-1, keepdim=True).to(self.logits.dtype)
        log_w = torch.full_like(anchor_rows, -math.inf)
        log_w = torch.where(positive, log_pw - n_pos.log(), log_w)
        log_w = torch.where(negative, log_nw - n_neg.log(), log_w)
        weighted = anchor_rows + log_w
        lse = torch.logsumexp(weighted, dim=-1)
        if not means:
            return lse.reshape(2, -1)
        with torch.no_grad():
            p = (weighted.detach() - lse.detach()[:, None]).exp()
            mean = torch.where(p > 0, p * anchor_rows.detach(), torch.zeros_like(p)).sum(dim=-1)
        return lse.reshape(2, -1), mean.reshape(2, -1)

    def _log_partition_distinct(self, log_pw: float, log_nw: float, means: bool):
        batch = self.size
        if log_nw == -math.inf:  # positives only: each anchor has exactly one
            value = self.positive + log_pw
            return (value, self.positive.detach()) if means else value
        if self.mode == "bimodal":
            log_nw -= math.log(batch - 1)
            diagonals = ((0, log_pw),)
            if self.column_logits is None:
                out = weighted_logsumexp(self.logits, log_nw, diagonals, means=means)
                rows, columns = out[0], out[1]
                row_mean, column_mean = (out[2], out[3]) if means else (None, None)
            else:
                out_rows = weighted_logsumexp(self.logits, log_nw, diagonals, columns=False, means=means)
                out_columns = weighted_logsumexp(self.column_logits, log_nw, diagonals, rows=False, means=means)
                rows, columns = out_rows[0], out_columns[1]
                row_mean, column_mean = (out_rows[2], out_columns[3]) if means else (None, None)
            value = torch.stack([rows, columns])
            return (value, torch.stack([row_mean, column_mean])) if means else value
        log_nw -= math.log(2 * batch - 2)
        diagonals = ((0, -math.inf), (batch, log_pw), (-batch, log_pw))
        out = weighted_logsumexp(self.logits, log_nw, diagonals, columns=False, means=means)
        value = out[0].reshape(2, batch)
        return (value, out[2].reshape(2, batch)) if means else value

    def _log_partition_chunked(self, log_pw: float, log_nw: float, means: bool = False):
        """log_partition from the features, ``chunk_size`` rows of logits at a time.

        Every anchor's negatives share one log-weight, base = log_nw - log(negatives); the
        kernel sums exp(s + delta) with delta the positives' log_pw - log(positives) - base and
        -inf on the non-candidates (the anchor, its same-modality duplicates), then adds base.
        A one-sided batch (``side``) runs the kernel once per direction, on operands detached so
        that each direction's logits carry gradient to its side only (no means there).
        """
        a, b, scale = self.features
        batch = self.size
        counts = torch.bincount(self.inverse)[self.inverse].to(a.dtype)  # (B,) rows sharing each row's index
        own = torch.arange(batch, device=a.device)
        if self.side is not None and means:
            raise ValueError("a one-sided batch has no means")
        mean = None
        if self.mode == "bimodal":
            base = log_nw - (batch - counts).log()
            r, c = _same_index_pairs(self.inverse)
            delta = (log_pw - counts[r].log() - base[r]) if log_pw > -math.inf else torch.full_like(base[r], -math.inf)
            if self.side is None:
                out = pair_logsumexp(a, b, scale, (r, c, delta), chunk_size=self.chunk_size,
                                     picks="diagonal" if self._positive is None else None, means=means)
                rows, columns, picked = out[:3]
                mean = torch.stack(out[3:]) if means else None
            else:
                (row_a, row_b, row_scale), (column_a, column_b, column_scale) = self._one_sided_operands()
                rows = pair_logsumexp(row_a, row_b, row_scale, (r, c, delta), columns=False, chunk_size=self.chunk_size)[0]
                columns = pair_logsumexp(column_a, column_b, column_scale, (r, c, delta), rows=False,
                                         chunk_size=self.chunk_size)[1]
                picked = None
            value = torch.stack([rows, columns]) + base
        else:
            base = log_nw - (2 * batch - 2 * counts).log().repeat(2)
            r, c = _same_index_pairs(self.inverse.repeat(2))
            positive = (r < batch) != (c < batch)  # the other modality: a positive; the same: not a candidate
            delta = torch.where(positive, log_pw - counts.repeat(2)[r].log() - base[r], -math.inf)
            if self.side is None:
                views = torch.cat([a, b])
                out = pair_logsumexp(views, views, scale, (r, c, delta), columns=False, chunk_size=self.chunk_size,
                                     picks=(own, own + batch) if self._positive is None else None, means=means)
                rows, picked = out[0], out[2]
                mean = out[3].reshape(2, batch) if means else None
            else:
                (left, right, side_scale), _ = self._one_sided_operands()
                rows, picked = pair_logsumexp(left, right, side_scale, (r, c, delta), columns=False,
                                              chunk_size=self.chunk_size)[0], None
            value = (rows + base).reshape(2, batch)
        if picked is not None:
            self._positive = torch.stack([picked, picked])
        return (value, mean) if means else value

    def _one_sided_operands(self):
        """((a, b, scale) of direction 0, of direction 1) for ``pair_logsumexp`` on a one-sided
        batch: the side without gradient detached (unimodal: the views, direction 1 unused)."""
        a, b, scale = self.features
        anchor = self.side == "anchor"
        if self.mode == "unimodal":
            views = torch.cat([a, b])
            operands = (views, views.detach(), scale) if anchor else (views.detach(), views, scale.detach())
            return operands, None
        factor = scale if anchor else scale.detach()
        rows = (a, b.detach()) if anchor else (a.detach(), b)  # direction 0: anchors a_r are rows
        columns = (a.detach(), b) if anchor else (a, b.detach())  # direction 1: anchors b_c are columns
        return (*rows, factor), (*columns, factor)

    def _log_partition_positives(self, log_pw: float, means: bool):
        """A chunked batch's positives-only partition: log_pw + log mean_{c pos} exp(s_rc) over
        the same-index pairs (r, c) alone, their logits from row-wise products. Direction 0
        groups them by r, direction 1 by c (the relation is symmetric, so in unimodal mode the
        b-view anchors read the same pairs)."""
        a, b, scale = self.features
        batch = self.size
        r, c = _same_index_pairs(self.inverse)
        logits = scale * torch.linalg.vecdot(a[r], b[c])
        log_counts = torch.bincount(self.inverse)[self.inverse].to(a.dtype).log()
        values, mean = [], []
        for group in (r, c):
            with torch.no_grad():
                shift = logits.new_full((batch,), -math.inf).scatter_reduce(0, group, logits, "amax")
                shift = shift.clamp(min=torch.finfo(a.dtype).min)
            total = logits.new_zeros(batch).index_add(0, group, (logits - shift[group]).exp())
            lse = total.log() + shift
            values.append(lse + log_pw - log_counts)
            if means:
                with torch.no_grad():
                    p = (logits - lse[group]).exp()
                    mean.append(logits.new_zeros(batch).index_add(0, group, p * logits).detach())
        value = torch.stack(values)
        return (value, torch.stack(mean)) if means else value

    def _masks(self) -> tuple[Tensor, Tensor, Tensor]:
        """Logits arranged with one anchor per row, and its positive and negative masks.

        Shapes: bimodal (2B, B) (the a-anchor rows, then the b-anchor rows from the transpose),
        unimodal (2B, 2B).
        """
        same = self.index[:, None] == self.index[None, :]
        if self.mode == "bimodal":
            columns = self.logits if self.column_logits is None else self.column_logits
            rows = torch.cat([self.logits, columns.T])
            positive = torch.cat([same, same])
            return rows, positive, ~positive
        batch = self.size
        same_views = same.repeat(2, 2)
        modality = torch.arange(2 * batch, device=same.device) >= batch
        cross = modality[:, None] != modality[None, :]
        return self.logits, same_views & cross, ~same_views


def _logits(a: Tensor, b: Tensor, scale: Tensor, mode: str) -> Tensor:
    """s = scale * a @ b.T (bimodal, (B, B)) or scale * v @ v.T, v = [a; b] (unimodal, (2B, 2B))."""
    if mode == "bimodal":
        return (scale * a) @ b.T
    views = torch.cat([a, b])
    return (scale * views) @ views.T


def _positive(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """(2, B) the pairs' logits scale <a_i, b_i>, from a row-wise product rather than the matrix's
    diagonal, so that their gradient costs O(B d) instead of a dense (B, B) pass."""
    diagonal = scale * (a * b).sum(dim=1)
    return torch.stack([diagonal, diagonal])


def _same_index_pairs(inverse: Tensor) -> tuple[Tensor, Tensor]:
    """Every (r, c) with inverse[r] == inverse[c] (r == c included), grouped by r: O(sum of squared counts)."""
    counts = torch.bincount(inverse)
    order = torch.argsort(inverse, stable=True)  # rows grouped by item
    first = torch.cumsum(counts, 0) - counts  # where each item's group starts in ``order``
    per_row = counts[inverse]
    rows = torch.repeat_interleave(torch.arange(inverse.numel(), device=inverse.device), per_row)
    offset = (torch.arange(rows.numel(), device=inverse.device)
              - torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row, per_row))
    return rows, order[first[inverse[rows]] + offset]
