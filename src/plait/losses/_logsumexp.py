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


# ------------------------------------------------------------------------------------------------
# From the features: the logit matrix s = scale * a @ b.T is never materialised.

LOG2E = 1.0 / math.log(2.0)
CHUNK_ROWS = 256  # default rows per block (measured: benchmarks/loss_speed.py --chunk-sweep)
DENSE_ROWS = 128  # logit matrices of at most this many rows: plain autograd ops are faster


def use_chunks(n_rows: int, chunk_size: int | None) -> bool:
    """Whether a loss computes a logit matrix of ``n_rows`` rows block by block (``chunk_size``
    None: never, the dense formula)."""
    return chunk_size is not None and n_rows > DENSE_ROWS


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def pair_logsumexp(
    a: Tensor, b: Tensor, scale: Tensor, entries: tuple[Tensor, Tensor, Tensor] | None = None,
    rows: bool = True, columns: bool = True, chunk_size: int = CHUNK_ROWS,
) -> tuple[Tensor | None, Tensor | None]:
    """Row and column log-sum-exps of s = scale * a @ b.T + delta, ``chunk_size`` rows at a time::

        rows[r] = log sum_c exp(s_rc)  (R,)        columns[c] = log sum_r exp(s_rc)  (C,)

    a (R, d), b (C, d) of one floating dtype, ``scale`` a scalar tensor of it; delta is 0 except at
    ``entries`` = (r, c, value), three (E,) tensors (value -inf removes the entry). The (R, C)
    matrix is never formed: memory O(chunk_size * C + (R + C) d). The forward keeps the row
    results and a running merge of the columns' block results; the backward recomputes each block
    and accumulates d/da, d/db and d/dscale. Differentiable in a, b and scale (the entries are
    constants); an unrequested side is returned as None. The block is computed in base 2
    (exp2 of the logits times log2 e), the faster exponential on CPU.
    """
    if check_chunk_size(chunk_size) is None:
        raise ValueError("chunk_size must be a positive integer, got None")
    if entries is None:
        entries = (a.new_empty(0, dtype=torch.long), a.new_empty(0, dtype=torch.long), a.new_empty(0))
    order = torch.argsort(entries[0], stable=True)
    r, c, value = entries[0][order], entries[1][order], entries[2][order].to(a.dtype) * LOG2E
    starts = torch.arange(0, a.shape[0] + chunk_size, chunk_size, device=r.device)
    cuts = torch.searchsorted(r, starts).tolist()
    out_rows, out_columns = _PairLogSumExp.apply(a, b, scale.reshape(()), r, c, value, cuts, rows, columns, chunk_size)
    return (out_rows if rows else None), (out_columns if columns else None)


def _pair_block(a_t: Tensor, b: Tensor, start: int, stop: int, entries, cut: tuple[int, int], out: Tensor) -> Tensor:
    """Rows [start, stop) of the base-2 logits a_t @ b.T + delta (a_t = a * scale * log2 e), in ``out``."""
    block = torch.mm(a_t[start:stop], b.T, out=out[: stop - start])
    lo, hi = cut
    if hi > lo:
        r, c, value = entries
        block.index_put_((r[lo:hi] - start, c[lo:hi]), value[lo:hi], accumulate=True)
    return block


def _log2sumexp2(block: Tensor, dim: int, scratch: Tensor) -> Tensor:
    """log2 sum exp2(block) along ``dim``, shifted by the maximum (an all -inf line gives -inf)."""
    shift = block.amax(dim=dim, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
    torch.sub(block, shift, out=scratch).exp2_()
    return scratch.sum(dim=dim).log2_().add_(shift.squeeze(dim))


def _softmax_shift(log2_sums: Tensor) -> Tensor:
    """The base-2 log-sum-exps to subtract in the backward; an empty line (-inf) gives a zero softmax."""
    return torch.where(log2_sums == -math.inf, math.inf, log2_sums)


class _PairLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, r, c, value, cuts, want_rows, want_columns, chunk):
        ctx.set_materialize_grads(False)
        n_rows, n_columns = a.shape[0], b.shape[0]
        a_t = a * (scale * LOG2E)
        rows2 = a.new_full((n_rows,), -math.inf)
        columns2 = a.new_full((n_columns,), -math.inf)
        step = min(chunk, n_rows)
        workspace, scratch = a.new_empty(step, n_columns), a.new_empty(step, n_columns)
        for k, start in enumerate(range(0, n_rows, chunk)):
            stop = min(start + chunk, n_rows)
            block = _pair_block(a_t, b, start, stop, (r, c, value), (cuts[k], cuts[k + 1]), workspace)
            tmp = scratch[: stop - start]
            if want_rows:
                rows2[start:stop] = _log2sumexp2(block, 1, tmp)
            if want_columns:
                columns2 = torch.logaddexp2(columns2, _log2sumexp2(block, 0, tmp))
        ctx.save_for_backward(a, b, scale, r, c, value, rows2, columns2)
        ctx.settings = (cuts, want_rows, want_columns, chunk)
        return rows2 * math.log(2.0), columns2 * math.log(2.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, grad_columns):
        a, b, scale, r, c, value, rows2, columns2 = ctx.saved_tensors
        cuts, want_rows, want_columns, chunk = ctx.settings
        use_rows = want_rows and grad_rows is not None
        use_columns = want_columns and grad_columns is not None
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        none = (None,) * 7
        if not (use_rows or use_columns):
            return (torch.zeros_like(a) if need_a else None, torch.zeros_like(b) if need_b else None,
                    torch.zeros_like(scale) if need_scale else None, *none)
        a_t = a * (scale * LOG2E)
        row_shift, column_shift = _softmax_shift(rows2), _softmax_shift(columns2)
        step = min(chunk, a.shape[0])
        workspace, probs = a.new_empty(step, b.shape[0]), a.new_empty(step, b.shape[0])
        along_b = torch.empty_like(a) if (need_a or need_scale) else None  # P @ b
        along_a = torch.zeros_like(b) if need_b else None  # P.T @ a
        for k, start in enumerate(range(0, a.shape[0], chunk)):
            stop = min(start + chunk, a.shape[0])
            block = _pair_block(a_t, b, start, stop, (r, c, value), (cuts[k], cuts[k + 1]), workspace)
            p = _block_gradient(block, probs[: stop - start], row_shift[start:stop], column_shift,
                                grad_rows[start:stop] if use_rows else None, grad_columns if use_columns else None)
            if along_b is not None:
                torch.mm(p, b, out=along_b[start:stop])
            if along_a is not None:
                along_a.addmm_(p.T, a[start:stop])
        grad_a = along_b * scale if need_a else None
        grad_b = along_a * scale if need_b else None
        grad_scale = (a * along_b).sum() if need_scale else None
        return grad_a, grad_b, grad_scale, *none


def _block_gradient(block: Tensor, out: Tensor, row_shift: Tensor, column_shift: Tensor,
                    grad_rows: Tensor | None, grad_columns: Tensor | None) -> Tensor:
    """d loss / d s on a block: grad_rows[r] softmax_c(s)[r, c] + grad_columns[c] softmax_r(s)[r, c]
    (base-2 ``block``, shifts the base-2 log-sum-exps); overwrites ``block``."""
    if grad_rows is None:
        return block.sub_(column_shift[None, :]).exp2_().mul_(grad_columns[None, :])
    torch.sub(block, row_shift[:, None], out=out).exp2_().mul_(grad_rows[:, None])
    if grad_columns is not None:
        out.addcmul_(block.sub_(column_shift[None, :]).exp2_(), grad_columns[None, :])
    return out
