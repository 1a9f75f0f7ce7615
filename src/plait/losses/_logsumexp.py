"""Log-sum-exps over the rows and columns of a logit matrix, computed block by block.

``weighted_logsumexp`` (the gamma loss's): for logits s (R, C), already formed, and log-weights
w_rc that equal ``log_weight`` except on a few diagonals::

    rows[r] = log sum_c exp(s_rc + w_rc)        columns[c] = log sum_r exp(s_rc + w_rc)

With ``means=True`` it also returns, without gradient, the mean logit under each row's (column's)
weighted softmax, mean_r = sum_c p_rc s_rc with p_rc = exp(s_rc + w_rc - rows[r]): the slope
d rows[r] / d log(scale) that the gamma loss uses to carry a stored log Z to a new logit scale.
The weighted matrix is never materialised: forward and backward walk row blocks of about
``BLOCK_ELEMENTS`` entries, so the temporaries stay in cache and take O(block) memory; the
backward writes d loss / d s directly (one (R, C) tensor).

``pair_logsumexp`` (InfoNCE's and SogCLR's): the same sums from the features, s = scale a @ b.T
plus sparse log-weights, the logit matrix itself never formed: row blocks of s are computed in
the forward and again in the backward, which accumulates the gradients of a, b and the scale
directly; memory O(chunk * C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from plait._checks import is_int

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
    row_lse, column_lse, row_mean, column_mean = _WeightedLogSumExp.apply(logits, float(log_weight), tuple(diagonals),
                                                                          rows, columns)
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
CHUNK_ROWS = 1024  # default rows per block (measured: benchmarks/loss_speed.py --chunk-sizes)
DENSE_ROWS = 256  # logit matrices of at most this many rows: plain autograd ops are as fast or faster


def use_chunks(n_rows: int, chunk_size: int | None) -> bool:
    """Whether a loss computes a logit matrix of ``n_rows`` rows block by block (``chunk_size``
    None: never, the dense formula)."""
    return chunk_size is not None and n_rows > DENSE_ROWS


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def pair_logsumexp(
    a: Tensor, b: Tensor, scale: Tensor, entries: tuple[Tensor, Tensor, Tensor] | None = None,
    rows: bool = True, columns: bool = True, chunk_size: int = CHUNK_ROWS,
    picks: tuple[Tensor, Tensor] | str | None = None, means: bool = False,
) -> tuple[Tensor | None, ...]:
    """Row and column log-sum-exps of s = scale * a @ b.T + delta, ``chunk_size`` rows at a time::

        rows[r] = log sum_c exp(s_rc)  (R,)        columns[c] = log sum_r exp(s_rc)  (C,)

    a (R, d), b (C, d) of one floating dtype, ``scale`` a scalar tensor of it; delta is 0 except at
    ``entries`` = (r, c, value), three (E,) tensors (value -inf removes the entry). ``picks`` =
    (r, c), two (P,) tensors, or "diagonal" (r = c = 0..R-1): also return picked[k] =
    scale <a_r[k], b_c[k]> (P,), the deltas not added, its gradient folded into the blocks'.
    Returns (rows, columns, picked), None for what was not asked. ``means=True`` also returns
    (row_mean, column_mean), detached: the mean of scale <a_r, b_c> under each line's softmax
    p (the deltas weight the average but are not averaged), for the rows::

        row_mean[r] = sum_c p_rc scale <a_r, b_c>,      p_rc = exp(s_rc - rows[r])

    i.e. d rows[r] / d log(scale), the gamma loss's slope; it costs one more product and two
    sums per entry in the forward (and a second block-sized buffer on the common-shift path).

    The (R, C) matrix is never formed: memory O(chunk_size * C + (R + C) d). The forward keeps
    the row results and the columns' sums (or a running merge of their log-sum-exps); the
    backward recomputes each block (a single block, R <= chunk_size, is kept instead) and
    accumulates d/da, d/db and d/dscale. Differentiable in a, b and scale (the entries and picks
    are constants). The blocks are computed in base 2 (exp2 of the logits times log2 e, the
    faster exponential on CPU) and, where the logits' range allows, with one common shift, so
    that one exponential per entry serves both the rows and the columns (``_common_shift``).
    """
    if check_chunk_size(chunk_size) is None:
        raise ValueError("chunk_size must be a positive integer, got None")
    no_index = a.new_empty(0, dtype=torch.long)
    r, c, value = entries if entries is not None else (no_index, no_index, a.new_empty(0))
    diagonal = isinstance(picks, str)
    if diagonal and (picks != "diagonal" or a.shape[0] != b.shape[0]):
        raise ValueError(f"picks must be (rows, columns) or 'diagonal' (with as many rows as columns), got {picks!r}")
    pick_r, pick_c = (torch.arange(a.shape[0], device=a.device),) * 2 if diagonal else (picks or (no_index, no_index))
    layout = _Layout(chunk_size, rows, columns, picks is not None, diagonal,
                     *_by_row(r, c, value.to(a.dtype) * LOG2E, a.shape[0], chunk_size),
                     *_by_row(pick_r, pick_c, torch.arange(pick_r.numel(), device=a.device), a.shape[0], chunk_size),
                     pick_r, pick_c, means)
    out = _PairLogSumExp.apply(a, b, scale.reshape(()), layout)
    wanted = (rows, columns, picks is not None) + ((rows, columns) if means else ())
    return tuple(x if want else None for x, want in zip(out, wanted))


@dataclass
class _Layout:
    """What pair_logsumexp computes, and where its entries fall: each (r, c, extra) triple sorted
    by row, ``cuts`` its start in every row block (and the end)."""

    chunk: int
    rows: bool
    columns: bool
    picked: bool
    diagonal: bool
    entries: tuple[Tensor, Tensor, Tensor]  # base-2 deltas
    entry_cuts: list[int]
    picks: tuple[Tensor, Tensor, Tensor]  # (r, c, position in the caller's order)
    pick_cuts: list[int]
    pick_r: Tensor  # the caller's order
    pick_c: Tensor
    means: bool = False


def _by_row(r: Tensor, c: Tensor, extra: Tensor, n_rows: int, chunk: int) -> tuple[tuple[Tensor, Tensor, Tensor], list[int]]:
    order = torch.argsort(r, stable=True)
    r, c, extra = r[order], c[order], extra[order]
    starts = torch.arange(0, n_rows + chunk, chunk, device=r.device)
    return (r, c, extra), torch.searchsorted(r, starts).tolist()


def _blocks(a: Tensor, b: Tensor, alpha: float, layout: "_Layout", shift: float | None, out: Tensor,
            plain: bool = False):
    """Yield (k, start, stop, block): rows [start, stop) of the base-2 logits x = alpha a @ b.T +
    delta log2 e (alpha = scale log2 e), minus ``shift`` if given, written into ``out``;
    ``plain``: also the block's values at its entries before the deltas were added (E_k,)."""
    r, c, value = layout.entries
    bias = a.new_tensor(-shift if shift else 0.0)
    for k, start in enumerate(range(0, a.shape[0], layout.chunk)):
        stop = min(start + layout.chunk, a.shape[0])
        block = out[: stop - start]
        torch.addmm(bias, a[start:stop], b.T, beta=1 if shift else 0, alpha=alpha, out=block)
        lo, hi = layout.entry_cuts[k], layout.entry_cuts[k + 1]
        if plain:
            before = block[r[lo:hi] - start, c[lo:hi]]
        if hi > lo:
            block.index_put_((r[lo:hi] - start, c[lo:hi]), value[lo:hi], accumulate=True)
        yield (k, start, stop, block, before) if plain else (k, start, stop, block)


def _common_shift(a: Tensor, b: Tensor, alpha: float, value: Tensor) -> float | None:
    """One shift K for every block when all the base-2 logits x lie within h of it, h = 3/4 of the
    dtype's exponent range below 1 (94.5 in float32): then exp2(x - K) neither overflows nor
    leaves the normal numbers, and one exponential per entry serves both the rows and the
    columns. |x| <= alpha max|a_r| max|b_c| (Cauchy-Schwarz), moved by the finite deltas;
    K is the middle of that interval (0 without deltas). None (the exact blocks, each line
    shifted by its own maximum) otherwise: unit features at temperatures below about 0.015."""
    bound = abs(alpha) * float(a.norm(dim=1).max() * b.norm(dim=1).max())
    finite = value[torch.isfinite(value)]
    high = bound + (max(0.0, float(finite.max())) if finite.numel() else 0.0)
    low = -bound + (min(0.0, float(finite.min())) if finite.numel() else 0.0)
    limit = -0.75 * math.log2(torch.finfo(a.dtype).tiny)
    return (high + low) / 2 if (high - low) / 2 <= limit else None  # also None for NaN / inf


def _sub_rows(n_rows: int, n_columns: int) -> int:
    """Rows of the scratch that the elementwise steps walk an (n_rows, n_columns) matrix with:
    128 sqrt(n_rows n_columns) entries within [2^14, 2^20], balancing the steps' count against
    the cost of touching a fresh buffer (small ones are reused by the allocator)."""
    entries = min(1 << 20, max(1 << 14, int(128 * math.sqrt(n_rows * n_columns))))
    return max(1, entries // max(1, n_columns))


class _PairLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, layout):
        ctx.set_materialize_grads(False)
        alpha = float(scale) * LOG2E
        shift = _common_shift(a, b, alpha, layout.entries[2])
        workspace = a.new_empty(min(layout.chunk, a.shape[0]), b.shape[0])
        kept = workspace
        blocks = _blocks(a, b, alpha, layout, shift, workspace, plain=layout.means)
        if layout.means:
            if shift is None:
                rows2, columns2, row_mean, column_mean = _exact_lse_means(blocks, a.shape[0], b.shape[0], layout, workspace)
            else:
                kept = torch.empty_like(workspace)
                rows2, columns2, row_mean, column_mean = _shifted_lse_means(blocks, a.shape[0], b.shape[0], layout, shift, kept)
        elif shift is None:
            rows2, columns2 = _exact_lse(blocks, a.shape[0], b.shape[0], layout, workspace)
        else:
            rows2, columns2 = _shifted_lse(blocks, a.new_zeros(a.shape[0]), a.new_zeros(b.shape[0]), layout, shift)
        if not layout.means:
            row_mean = column_mean = a.new_empty(0)
        picked = _picked(a, b, scale, layout)
        # A single block (at most ``chunk`` rows) is kept for the backward instead of recomputed:
        # exp2(x - K) on the common-shift path, x on the exact one. The backward overwrites it, so
        # it is an attribute, released there (a second backward recomputes it).
        ctx.kept = kept if a.shape[0] <= layout.chunk else None
        ctx.save_for_backward(a, b, scale, rows2, columns2)
        ctx.settings = (layout, shift, alpha)
        ctx.mark_non_differentiable(row_mean, column_mean)
        return rows2 * math.log(2.0), columns2 * math.log(2.0), picked, row_mean, column_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, grad_columns, grad_picked, _grad_row_mean, _grad_column_mean):
        a, b, scale, rows2, columns2 = ctx.saved_tensors
        layout, shift, alpha = ctx.settings
        kept, ctx.kept = ctx.kept, None
        grad_rows = grad_rows if layout.rows else None
        grad_columns = grad_columns if layout.columns else None
        grad_picked = grad_picked if layout.picked else None
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        if grad_rows is None and grad_columns is None and grad_picked is None:
            return (torch.zeros_like(a) if need_a else None, torch.zeros_like(b) if need_b else None,
                    torch.zeros_like(scale) if need_scale else None, None)
        along_b = torch.empty_like(a) if (need_a or need_scale) else None  # P @ b, P = d loss / d s
        along_a = torch.zeros_like(b) if need_b else None  # P.T @ a
        use_lse = grad_rows is not None or grad_columns is not None
        factors = None if shift is None or not use_lse else _softmax_factors(rows2, columns2, grad_rows, grad_columns, shift)
        exact = use_lse and factors is None
        if kept is not None and (shift is None or factors is not None or not use_lse):
            blocks = [(0, 0, a.shape[0], kept)]  # exp2(x - K), or x (exact)
            exponentiated = shift is not None
        else:
            workspace = a.new_empty(min(layout.chunk, a.shape[0]), b.shape[0])
            blocks = _blocks(a, b, alpha, layout, None if exact else shift, workspace)
            exponentiated = False
        # exact blocks: each softmax shifted by its own log-sum-exp (an empty line, -inf, gives 0)
        row_shift, column_shift = (torch.where(x == -math.inf, math.inf, x) for x in (rows2, columns2))
        pick_r, pick_c, pick_order = layout.picks
        picked_grads = None if grad_picked is None else grad_picked[pick_order]
        scratch = a.new_empty(min(_sub_rows(a.shape[0], b.shape[0]), a.shape[0]), b.shape[0])  # pages touched if used
        for k, start, stop, block in blocks:
            if not use_lse:
                p = block.zero_()
            elif exact:
                p = _exact_gradient(block, scratch, row_shift[start:stop], column_shift,
                                    None if grad_rows is None else grad_rows[start:stop], grad_columns)
            else:
                p = _shifted_gradient(block, scratch, factors, start, exponentiated)
            lo, hi = layout.pick_cuts[k], layout.pick_cuts[k + 1]
            if picked_grads is not None and hi > lo:  # d s_rc / d s_rc = 1 at the picks
                p.index_put_((pick_r[lo:hi] - start, pick_c[lo:hi]), picked_grads[lo:hi], accumulate=True)
            if along_b is not None:
                torch.mm(p, b, out=along_b[start:stop])
            if along_a is not None:
                along_a.addmm_(p.T, a[start:stop])
        grad_scale = torch.dot(a.reshape(-1), along_b.reshape(-1)).reshape(scale.shape) if need_scale else None
        grad_a = along_b.mul_(scale) if need_a else None
        grad_b = along_a.mul_(scale) if need_b else None
        return grad_a, grad_b, grad_scale, None


def _picked(a: Tensor, b: Tensor, scale: Tensor, layout: _Layout) -> Tensor:
    """scale <a_r, b_c> at the picks (P,), in the caller's order; empty if none were asked."""
    if layout.diagonal:
        return torch.linalg.vecdot(a, b) * scale
    return torch.linalg.vecdot(a[layout.pick_r], b[layout.pick_c]) * scale


def _shifted_lse(blocks, row_sums: Tensor, column_sums: Tensor, layout: _Layout, shift: float):
    """Base-2 row and column log-sum-exps from the blocks x - K: log2 sum exp2(x - K) + K, the
    sums accumulated into the zero vectors given (an unrequested side is left at -inf); each
    block is left holding exp2(x - K)."""
    for _, start, stop, block in blocks:
        block.exp2_()
        if layout.rows:
            torch.sum(block, dim=1, out=row_sums[start:stop])
        if layout.columns:
            column_sums.add_(block.sum(dim=0))
    return row_sums.log2_().add_(shift), column_sums.log2_().add_(shift)


def _exact_lse(blocks, n_rows: int, n_columns: int, layout: _Layout, like: Tensor):
    """Base-2 row and column log-sum-exps for any logit range: a few rows at a time, each row (and
    each column of those rows) shifted by its own maximum, the columns merged over them; the
    blocks are left as they were."""
    rows = like.new_full((n_rows,), -math.inf)
    columns = like.new_full((n_columns,), -math.inf)
    scratch = like.new_empty(min(_sub_rows(n_rows, n_columns), like.shape[0]), n_columns)
    for _, start, stop, block in blocks:
        for lo in range(0, stop - start, scratch.shape[0]):
            part = block[lo: lo + scratch.shape[0]]
            tmp = scratch[: part.shape[0]]
            if layout.rows:
                rows[start + lo: start + lo + part.shape[0]] = _log2sumexp2(part, 1, tmp)
            if layout.columns:
                columns = torch.logaddexp2(columns, _log2sumexp2(part, 0, tmp))
    return rows, columns


def _shifted_lse_means(blocks, n_rows: int, n_columns: int, layout: _Layout, shift: float, exps: Tensor):
    """_shifted_lse and the lines' mean logits (in s units): on each block, E = exp2(x - K) is
    written into ``exps`` (left holding the last block's), the entries are given back their
    values before the deltas and the block multiplied by E in place, so that the sums of
    E (x_plain - K) give the means. An entry removed (-inf) has E = 0 and so no weight."""
    r, c, _ = layout.entries
    row_sums, column_sums = exps.new_zeros(n_rows), exps.new_zeros(n_columns)
    row_num, column_num = exps.new_zeros(n_rows), exps.new_zeros(n_columns)
    for k, start, stop, block, plain in blocks:
        e = torch.exp2(block, out=exps[: stop - start])
        lo, hi = layout.entry_cuts[k], layout.entry_cuts[k + 1]
        if hi > lo:
            block.index_put_((r[lo:hi] - start, c[lo:hi]), plain)
        block.mul_(e)
        if layout.rows:
            torch.sum(e, dim=1, out=row_sums[start:stop])
            torch.sum(block, dim=1, out=row_num[start:stop])
        if layout.columns:
            column_sums.add_(e.sum(dim=0))
            column_num.add_(block.sum(dim=0))
    row_mean = row_num.div_(row_sums).add_(shift).mul_(math.log(2.0))
    column_mean = column_num.div_(column_sums).add_(shift).mul_(math.log(2.0))
    return row_sums.log2_().add_(shift), column_sums.log2_().add_(shift), row_mean, column_mean


def _exact_lse_means(blocks, n_rows: int, n_columns: int, layout: _Layout, like: Tensor):
    """_exact_lse and the lines' mean logits (in s units), a few rows at a time: each part is
    copied with its entries' values before the deltas (``plain``) to weight by the softmax of
    the part with them; the columns' means merged over the parts as their log-sum-exps are."""
    r, c, _ = layout.entries
    rows, columns = like.new_full((n_rows,), -math.inf), like.new_full((n_columns,), -math.inf)
    row_mean, column_mean = like.new_zeros(n_rows), like.new_zeros(n_columns)
    step = min(_sub_rows(n_rows, n_columns), like.shape[0])
    scratch, plain = like.new_empty(step, n_columns), like.new_empty(step, n_columns)
    tiny = torch.finfo(like.dtype).min
    for k, start, stop, block, before in blocks:
        lo, hi = layout.entry_cuts[k], layout.entry_cuts[k + 1]
        er, ec = r[lo:hi] - start, c[lo:hi]
        cuts = torch.searchsorted(er, torch.arange(0, stop - start + step, step, device=er.device)).tolist()
        for j, first in enumerate(range(0, stop - start, step)):
            part = block[first: first + step]
            n = part.shape[0]
            tmp, flat = scratch[:n], plain[:n].copy_(part)
            if cuts[j + 1] > cuts[j]:
                flat.index_put_((er[cuts[j]:cuts[j + 1]] - first, ec[cuts[j]:cuts[j + 1]]), before[cuts[j]:cuts[j + 1]])
            if layout.rows:
                shift = part.amax(dim=1, keepdim=True).clamp_(min=tiny)
                total = torch.sub(part, shift, out=tmp).exp2_().sum(dim=1)
                row_mean[start + first: start + first + n] = tmp.mul_(flat).sum(dim=1).div_(total)
                rows[start + first: start + first + n] = total.log2_().add_(shift.squeeze(1))
            if layout.columns:
                shift = part.amax(dim=0, keepdim=True).clamp_(min=tiny)
                total = torch.sub(part, shift, out=tmp).exp2_().sum(dim=0)
                mean = tmp.mul_(flat).sum(dim=0).div_(total)
                lse = total.log2_().add_(shift.squeeze(0))
                merged = torch.logaddexp2(columns, lse)
                old_part = torch.exp2(columns - merged).nan_to_num_(nan=0.0)
                new_part = torch.exp2(lse - merged).nan_to_num_(nan=0.0)
                column_mean = column_mean * old_part + mean.nan_to_num_(nan=0.0) * new_part
                columns = merged
    return rows, columns, row_mean.mul_(math.log(2.0)), column_mean.mul_(math.log(2.0))


def _log2sumexp2(block: Tensor, dim: int, scratch: Tensor) -> Tensor:
    """log2 sum exp2(block) along ``dim``, shifted by the maximum (an all -inf line gives -inf)."""
    shift = block.amax(dim=dim, keepdim=True).clamp_(min=torch.finfo(block.dtype).min)
    torch.sub(block, shift, out=scratch).exp2_()
    return scratch.sum(dim=dim).log2_().add_(shift.squeeze(dim))


def _softmax_factors(rows2: Tensor, columns2: Tensor, grad_rows: Tensor | None, grad_columns: Tensor | None,
                     shift: float) -> tuple[Tensor | None, Tensor | None] | None:
    """(u, v) with d loss / d s_rc = exp2(x_rc - K) (u_r + v_c): u_r = grad_rows[r] exp2(K - rows2[r]),
    v_c likewise (0 for an empty line); None (use the exact blocks) if one of them overflows."""
    factors = []
    for grad, lse in ((grad_rows, rows2), (grad_columns, columns2)):
        factor = None if grad is None else torch.where(lse == -math.inf, 0.0, grad * torch.exp2(shift - lse))
        if factor is not None and not bool(torch.isfinite(factor).all()):
            return None
        factors.append(factor)
    return factors[0], factors[1]


def _shifted_gradient(block: Tensor, scratch: Tensor, factors, start: int, exponentiated: bool) -> Tensor:
    """d loss / d s on a block of x - K (``exponentiated``: of exp2(x - K)), in place:
    exp2(x - K) (u_r + v_c), the outer sum u + v formed a few rows at a time in ``scratch``."""
    u, v = factors
    if not exponentiated:
        block.exp2_()
    if u is None:
        return block.mul_(v[None, :])
    u = u[start: start + block.shape[0], None]
    if v is None:
        return block.mul_(u)
    for lo in range(0, block.shape[0], scratch.shape[0]):
        part = block[lo: lo + scratch.shape[0]]
        part.mul_(torch.add(u[lo: lo + part.shape[0]], v[None, :], out=scratch[: part.shape[0]]))
    return block


def _exact_gradient(block: Tensor, scratch: Tensor, row_shift: Tensor, column_shift: Tensor,
                    grad_rows: Tensor | None, grad_columns: Tensor | None) -> Tensor:
    """d loss / d s on a block of base-2 logits x, in place: grad_rows[r] softmax_c[r, c] +
    grad_columns[c] softmax_r[r, c], softmax_c[r, c] = exp2(x_rc - row_shift[r]) (base-2
    log-sum-exps), the row part formed a few rows at a time in ``scratch``."""
    if grad_rows is None:
        return block.sub_(column_shift[None, :]).exp2_().mul_(grad_columns[None, :])
    if grad_columns is None:
        return block.sub_(row_shift[:, None]).exp2_().mul_(grad_rows[:, None])
    for lo in range(0, block.shape[0], scratch.shape[0]):
        part = block[lo: lo + scratch.shape[0]]
        n = part.shape[0]
        row_part = torch.sub(part, row_shift[lo: lo + n, None], out=scratch[:n]).exp2_().mul_(grad_rows[lo: lo + n, None])
        part.sub_(column_shift[None, :]).exp2_().mul_(grad_columns[None, :]).add_(row_part)
    return block
