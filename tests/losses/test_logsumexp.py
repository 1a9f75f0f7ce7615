import math

import pytest
import torch

from plait.losses import _logsumexp
from plait.losses._logsumexp import weighted_logsumexp


def _dense(logits, log_weight, diagonals):
    w = torch.full_like(logits, log_weight)
    for offset, value in diagonals:
        w.diagonal(offset).fill_(value)
    return logits + w


@pytest.mark.parametrize("shape", [(5, 5), (6, 6), (7, 3)])
@pytest.mark.parametrize("diagonals", [(), ((0, -1.5),), ((0, -math.inf), (3, 0.2), (-3, 0.2))])
@pytest.mark.parametrize("block_elements", [1, 7, 1 << 18])
@pytest.mark.parametrize("dense_elements", [0, 1 << 14])
def test_matches_dense_logsumexp_value_and_gradient(shape, diagonals, block_elements, dense_elements, monkeypatch):
    monkeypatch.setattr(_logsumexp, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(_logsumexp, "DENSE_ELEMENTS", dense_elements)
    logits = (5 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    rows, columns = weighted_logsumexp(logits, -0.7, diagonals)
    weighted = _dense(logits, -0.7, diagonals)
    want_rows, want_columns = torch.logsumexp(weighted, 1), torch.logsumexp(weighted, 0)
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(columns, want_columns)
    g_rows, g_columns = torch.randn(shape[0], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    (got,) = torch.autograd.grad((rows * g_rows).sum() + (columns * g_columns).sum(), logits)
    (want,) = torch.autograd.grad((want_rows * g_rows).sum() + (want_columns * g_columns).sum(), logits)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dense_elements", [0, 1 << 14])
def test_one_side_only(dense_elements, monkeypatch):
    monkeypatch.setattr(_logsumexp, "DENSE_ELEMENTS", dense_elements)
    logits = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    rows, columns = weighted_logsumexp(logits, 0.0, (), columns=False)
    assert columns is None
    (got,) = torch.autograd.grad(rows.sum(), logits)
    torch.testing.assert_close(got, torch.softmax(logits, 1))
