"""Weighted log-sum-exp over the rows and columns of a logit matrix, computed block by block.

For logits s (R, C) and log-weights w_rc that equal ``log_weight`` except on a few diagonals::

    rows[r] = log sum_c exp(s_rc + w_rc)        columns[c] = log sum_r exp(s_rc + w_rc)

The weighted matrix is never materialised: forward and backward walk row blocks of about
``BLOCK_ELEMENTS`` entries, so the temporaries stay in cache and take O(block) memory; the
backward writes d loss / d s directly (one (R, C) tensor). This is the hot path of the
per-sample losses at large batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

BLOCK_ELEMENTS = 1 << 18
DENSE_ELEMENTS = 1 << 14  # below this, plain autograd ops are faster than the block loop


def weighted_logsumexp(
    logits: Tensor, log_weight: float, diagonals: tuple[tuple[int, float], ...], rows: bool = True, columns: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """(rows, columns) log-sum-exps of ``logits + w``; ``diagonals`` lists (offset, log-weight)
    overrides for the entries (r, r + offset), -inf removing them. Differentiable in ``logits``."""
    if logits.numel() <= DENSE_ELEMENTS:
        weighted = _weighted_block(logits, 0, logits.shape[0], float(log_weight), diagonals, None)
        return (torch.logsumexp(weighted, 1) if rows else None), (torch.logsumexp(weighted, 0) if columns else None)
    row_lse, column_lse = _WeightedLogSumExp.apply(logits, float(log_weight), tuple(diagonals), rows, columns)
    return (row_lse if rows else None), (column_lse if columns else None)


def _weighted_block(logits: Tensor, start: int, stop: int, log_weight: float, diagonals, out: Tensor | None) -> Tensor:
    """logits[start:stop] + w, written into ``out`` (a reusable workspace) if given."""
    if out is None:
        block = logits[start:stop] + log_weight
    else:
        block = torch.add(logits[start:stop], log_weight, out=out[: stop - start])
    for offset, value in diagonals:
        entries = block.diagonal(start + offset)  # global (r, r + offset) for r in [start, stop)
        if value == -math.inf:
            entries.fill_(-math.inf)
        else:
            entries.add_(value - log_weight)
    return block


def _block_rows(n_rows: int, n_columns: int) -> int:
    return max(1, min(n_rows, BLOCK_ELEMENTS // max(1, n_columns)))


class _WeightedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, log_weight, diagonals, want_rows, want_columns):
        n_rows, n_columns = logits.shape
        step = _block_rows(n_rows, n_columns)
        row_lse = logits.new_empty(n_rows)
        column_lse = logits.new_full((n_columns,), -math.inf)
        workspace = logits.new_empty(step, n_columns)
        scratch = logits.new_empty(step, n_columns)
        with torch.no_grad():
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                block = _weighted_block(logits, start, stop, log_weight, diagonals, workspace)
                tmp = scratch[: stop - start]
                if want_rows:
                    shift = block.amax(dim=1, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
                    torch.sub(block, shift, out=tmp).exp_()
                    row_lse[start:stop] = tmp.sum(dim=1).log_().add_(shift.squeeze(1))
                if want_columns:
                    shift = block.amax(dim=0, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
                    torch.sub(block, shift, out=tmp).exp_()
                    column_lse = torch.logaddexp(column_lse, tmp.sum(dim=0).log_().add_(shift.squeeze(0)))
        ctx.save_for_backward(logits, row_lse, column_lse)
        ctx.settings = (log_weight, diagonals, want_rows, want_columns, step)
        return row_lse, column_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, grad_columns):
        logits, row_lse, column_lse = ctx.saved_tensors
        log_weight, diagonals, want_rows, want_columns, step = ctx.settings
        use_rows = want_rows and grad_rows is not None
        use_columns = want_columns and grad_columns is not None
        grad = torch.zeros_like(logits) if not (use_rows or use_columns) else torch.empty_like(logits)
        workspace = logits.new_empty(min(step, logits.shape[0]), logits.shape[1])
        for start in range(0, logits.shape[0] if (use_rows or use_columns) else 0, step):
            stop = min(start + step, logits.shape[0])
            block = _weighted_block(logits, start, stop, log_weight, diagonals, workspace)
            out = grad[start:stop]
            if use_rows:  # d rows[r] / d s_rc = softmax over the row
                torch.sub(block, row_lse[start:stop, None], out=out).exp_().mul_(grad_rows[start:stop, None])
            else:
                out.zero_()
            if use_columns:
                block.sub_(column_lse[None, :]).exp_().mul_(grad_columns[None, :])
                out.add_(block)
        return grad, None, None, None, None
