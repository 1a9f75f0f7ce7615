"""Brute-force per-element references the loss tests compare against (float64, plain loops)."""

from __future__ import annotations

import math

import torch


def _normalise(x):
    return x / x.norm(dim=1, keepdim=True)


def infonce_loop(a, b, temperature, mode="bimodal"):
    """Minibatch InfoNCE, one anchor at a time."""
    a, b = _normalise(a), _normalise(b)
    n = a.shape[0]
    if mode == "bimodal":
        total = 0.0
        for i in range(n):
            row = [a[i] @ b[j] / temperature for j in range(n)]
            col = [b[i] @ a[j] / temperature for j in range(n)]
            total = total + (-row[i] + torch.logsumexp(torch.stack(row), 0)) + (-col[i] + torch.logsumexp(torch.stack(col), 0))
        return total / (2 * n)
    views = torch.cat([a, b])
    total = 0.0
    for p in range(2 * n):
        partner = (p + n) % (2 * n)
        others = [views[p] @ views[q] / temperature for q in range(2 * n) if q != p]
        total = total - views[p] @ views[partner] / temperature + torch.logsumexp(torch.stack(others), 0)
    return total / (2 * n)


def candidate_sets(index, p, mode, batch):
    """For anchor row p of the stacked directions, (anchor vector id, positive ids, negative ids).

    Anchors/candidates are referred to as ("a", r) or ("b", r) rows of the batch.
    """
    if mode == "bimodal":
        side, r = ("a", p) if p < batch else ("b", p - batch)
        other = "b" if side == "a" else "a"
        pos = [(other, c) for c in range(batch) if index[c] == index[r]]
        neg = [(other, c) for c in range(batch) if index[c] != index[r]]
        return (side, r), pos, neg
    side, r = ("a", p) if p < batch else ("b", p - batch)
    other = "b" if side == "a" else "a"
    pos = [(other, c) for c in range(batch) if index[c] == index[r]]
    neg = [(s, c) for s in ("a", "b") for c in range(batch) if index[c] != index[r]]
    return (side, r), pos, neg


def log_zbatch_loop(a, b, index, scale, n_candidates, mode="bimodal", positive_weight=None, negative_weight=None):
    """(2B,) log of pw * mean_pos exp(s) + nw * mean_neg exp(s), one anchor at a time."""
    a, b = _normalise(a), _normalise(b)
    vec = {"a": a, "b": b}
    batch = a.shape[0]
    pw = 1.0 / n_candidates if positive_weight is None else positive_weight
    nw = (n_candidates - 1.0) / n_candidates if negative_weight is None else negative_weight
    out = []
    for p in range(2 * batch):
        (side, r), pos, neg = candidate_sets(index, p, mode, batch)
        anchor = vec[side][r]
        value = 0.0
        if pw > 0:
            value = value + pw * sum(torch.exp(scale * anchor @ vec[s][c]) for s, c in pos) / len(pos)
        if nw > 0:
            value = value + nw * sum(torch.exp(scale * anchor @ vec[s][c]) for s, c in neg) / len(neg)
        out.append(torch.log(value))
    return torch.stack(out)


def generalized_loop(a, b, temperature, mode="bimodal"):
    """The full-data loss: every item a candidate, Z_i = 1/n sum_j exp(s_ij)."""
    n = a.shape[0]
    index = list(range(n))
    count = n if mode == "bimodal" else 2 * n - 1
    log_z = log_zbatch_loop(a, b, index, 1.0 / temperature, count, mode)
    an, bn = _normalise(a), _normalise(b)
    positive = torch.stack([an[i] @ bn[i] / temperature for i in range(n)] * 2)
    return (log_z - positive).mean()


def log_z_exact(a, b, temperature, mode="bimodal"):
    """(2, N) exact log Z_i of every item, both directions."""
    n = a.shape[0]
    count = n if mode == "bimodal" else 2 * n - 1
    return log_zbatch_loop(a, b, list(range(n)), 1.0 / temperature, count, mode).reshape(2, n)


def lse(values):
    return math.log(sum(math.exp(v) for v in values))
