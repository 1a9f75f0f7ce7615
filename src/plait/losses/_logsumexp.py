"""Weighted log-sum-exp over the rows and columns of a logit matrix, computed block by block.

For logits s (R, C) and log-weights w_rc that equal ``log_weight`` except on a few diagonals::

    rows[r] = log sum_c exp(s_rc + w_rc)        columns[c] = log sum_r exp(s_rc + w_rc)

With ``means=True`` it also returns, without gradient, the mean logit under each row's (column's)
weighted softmax, mean_r = sum_c p_rc s_rc with p_rc = exp(s_rc + w_rc - rows[r]): the slope
d rows[r] / d log(scale) that the gamma loss uses to carry a stored log Z to a new logit scale.

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
    logits: Tensor, log_weight: float, diagonals: tuple[tuple[int, float], ...], rows: bool = True, columns: bool = True,
    means: bool = False,
) -> tuple[Tensor | None, ...]:
    """(rows, columns) log-sum-exps of ``logits + w``; ``diagonals`` lists (offset, log-weight)
    overrides for the entries (r, r + offset), -inf removing them. Differentiable in ``logits``.
    ``means=True`` returns (rows, columns, row_means, column_means), the means detached."""
    if logits.numel() <= DENSE_ELEMENTS:
        weighted = _weighted_block(logits, 0, logits.shape[0], float(log_weight), diagonals, None)
        row_lse = torch.logsumexp(weighted, 1) if rows else None
        column_lse = torch.logsumexp(weighted, 0) if columns else None
        if not means:
            return row_lse, column_lse
        with torch.no_grad():
            weighted, values = weighted.detach(), logits.detach()
            row_mean = (weighted - row_lse.detach()[:, None]).exp().mul(values).sum(1) if rows else None
            column_mean = (weighted - column_lse.detach()[None, :]).exp().mul(values).sum(0) if columns else None
        return row_lse, column_lse, row_mean, column_mean
    row_lse, column_lse, row_mean, column_mean = _WeightedLogSumExp.apply(logits, float(log_weight), tuple(diagonals), rows, columns)
    picked = (row_lse if rows else None), (column_lse if columns else None)
    return (*picked, (row_mean if rows else None), (column_mean if columns else None)) if means else picked


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
        row_mean = logits.new_zeros(n_rows)
        column_mean = logits.new_zeros(n_columns)
        workspace = logits.new_empty(step, n_columns)
        scratch = logits.new_empty(step, n_columns)
        with torch.no_grad():
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                block = _weighted_block(logits, start, stop, log_weight, diagonals, workspace)
                tmp = scratch[: stop - start]
                values = logits[start:stop]
                if want_rows:
                    shift = block.amax(dim=1, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
                    torch.sub(block, shift, out=tmp).exp_()
                    total = tmp.sum(dim=1)
                    row_mean[start:stop] = (tmp * values).sum(dim=1) / total
                    row_lse[start:stop] = total.log_().add_(shift.squeeze(1))
                if want_columns:
                    shift = block.amax(dim=0, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
                    torch.sub(block, shift, out=tmp).exp_()
                    total = tmp.sum(dim=0)
                    block_mean = (tmp * values).sum(dim=0) / total
                    block_lse = total.log_().add_(shift.squeeze(0))
                    merged = torch.logaddexp(column_lse, block_lse)
                    # running mean of the column softmax: reweight the old part and the new block
                    old_part = (column_lse - merged).nan_to_num(nan=0.0).exp()
                    new_part = (block_lse - merged).nan_to_num(nan=0.0).exp()
                    column_mean = column_mean * old_part + block_mean.nan_to_num(nan=0.0) * new_part
                    column_lse = merged
        ctx.save_for_backward(logits, row_lse, column_lse)
        ctx.mark_non_differentiable(row_mean, column_mean)
        ctx.settings = (log_weight, diagonals, want_rows, want_columns, step)
        return row_lse, column_lse, row_mean, column_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, grad_columns, _grad_row_mean, _grad_column_mean):
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
