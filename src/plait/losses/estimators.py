"""The E-step estimators of ``GammaContrastiveLoss``: where each anchor's rate estimate log Zhat_i comes from.

- ``EmaRates`` (``estimator="ema"``): a per-item moving average of the batch estimate, carried to the current
  logit scale;
- ``MemoryBank`` (``"memory"``): every item's latest features, the table the current anchors are scanned against;
- ``ExactTable`` (``"exact"``): every item's features under the current model, the exact rate;
- ``TableRates``: the E-step rate and the M-step terms of a batch from a table (``exact`` or ``memory``).

Each part is a view of the loss that composes it (``owner``): its buffers are registered on the loss under their
own names, so that the loss's ``state_dict()`` keys are flat and unchanged (``bank``, not ``memory_bank.bank``),
``loss.to(device)`` moves them and ``loss.bank`` reads them; it reads the loss's options (``mode``, ``chunk_size``,
``gamma``, ...), so there is one copy of each. Direction 0 of a (2, ...) tensor has the anchors of ``features_a``
(a; the images where that holds), direction 1 those of ``features_b`` (b; the texts). N: ``dataset_size``;
n: candidates per anchor (N bimodal, 2N - 1 unimodal); B: batch rows; d: feature dimension.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from plait.losses._batch import PairBatch
from plait.losses._inputs import prepare_pair

if TYPE_CHECKING:
    from plait.losses.gamma import GammaContrastiveLoss


class EmaRates:
    """``estimator="ema"``: a per-item exponential moving average of the batch rate estimate, in log space.

    With Zbatch_i the batch estimate (2, B), s the current logit scale and k the item's visit count after this visit::

        log Zhat_i <- log Zbatch_i                                               (first visit)
        log Zhat_i <- log( (1 - gamma_k) Zhat_i(s) + gamma_k Zbatch_i )          (later visits)
        slope_i    <- (1 - gamma_k) slope_i + gamma_k slopebatch_i,    scale_at_i <- s

    where log Zhat_i(s) = log Zhat_i + (s - scale_at_i) * slope_i carries the stored entry to the current scale to
    first order (``scale_correction=False``: log Zhat_i as stored), slope = d log Z / d scale (the softmax-weighted
    mean cosine of the anchor and its candidates), and gamma_k comes from ``gamma_for``.

    Buffers registered on the loss: ``scale_at`` (N,) the scale each entry was computed at, ``slope`` (2, N). The
    entries themselves are the loss's ``log_z`` (2, N), the visit counts its ``visits`` (N,). O(N) floats.
    """

    def __init__(self, owner: GammaContrastiveLoss):
        self.owner = owner
        owner.register_buffer("scale_at", torch.zeros(owner.dataset_size))
        owner.register_buffer("slope", torch.zeros(2, owner.dataset_size))

    def gamma_for(self, visit: Tensor) -> Tensor:
        """gamma_k (float64, ``visit``'s shape), the weight of the newest batch estimate at the k-th visit (k >= 2):
        ``gamma`` throughout, or with ``gamma_decay_visits`` = K > 0 the cosine decay from 1 (FastCLIP's schedule)::

            gamma_k = gamma + (1 - gamma) * (1 + cos(pi * min((k - 1) / K, 1))) / 2
        """
        gamma, decay_visits = self.owner.gamma, self.owner.gamma_decay_visits
        if decay_visits == 0:
            return torch.full(visit.shape, gamma, dtype=torch.float64, device=visit.device)
        progress = ((visit - 1).double() / decay_visits).clamp(0.0, 1.0)
        return gamma + (1.0 - gamma) * 0.5 * (1.0 + torch.cos(math.pi * progress))

    def estimate(self, index: Tensor, scale: Tensor, log_zbatch: Tensor) -> Tensor:
        """log Zhat (2, B): the stored entries of the items ``index`` (B,) carried to the scale ``scale`` (),
        ``log_zbatch`` (2, B) (no gradient) for the items never visited."""
        owner = self.owner
        with torch.no_grad():
            first = (owner.visits[index] == 0)[None, :]
            stored = owner.log_z[:, index].to(log_zbatch.dtype)
            if owner.scale_correction:
                stored = stored + (scale - owner.scale_at[index].to(scale.dtype))[None, :] * owner.slope[:, index].to(scale.dtype)
            return torch.where(first, log_zbatch, stored)

    def update(self, unique: Tensor, inverse: Tensor, log_zbatch: Tensor, slope: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """The new entries of the batch's items ``unique`` (U,) (``inverse`` (B,): each row's position in it) from
        ``log_zbatch`` and ``slope`` (2, B) (averaged over duplicate rows) at the scale ``scale`` ().

        Writes ``slope`` and ``scale_at`` of the items whose new entry and slope are finite; returns the new
        log Zhat (2, U) and that mask ``ok`` (U,), for the caller to write into ``log_z``."""
        owner = self.owner
        fresh = owner.reduce_duplicates(unique, inverse, log_zbatch, log_space=True)
        fresh_slope = owner.reduce_duplicates(unique, inverse, slope, log_space=False)
        first = owner.visits[unique] == 0
        weight = self.gamma_for(owner.visits[unique] + 1).to(fresh.dtype)
        old = owner.log_z[:, unique].to(fresh.dtype)
        old_slope = owner.slope[:, unique].to(fresh.dtype)
        if owner.scale_correction:  # the stored rate carried to the current scale
            old = old + (scale - owner.scale_at[unique].to(fresh.dtype)) * old_slope
        new = torch.logaddexp(torch.log1p(-weight) + old, weight.log() + fresh)
        new = torch.where(first, fresh, new)
        new_slope = torch.where(first, fresh_slope, (1 - weight) * old_slope + weight * fresh_slope)
        ok = torch.isfinite(new).all(0) & torch.isfinite(new_slope).all(0) & torch.isfinite(scale)
        written = unique[ok]
        owner.slope[:, written] = new_slope[:, ok].to(owner.slope.dtype)
        owner.scale_at[written] = scale.to(owner.scale_at.dtype)
        return new, ok

    def before_load(self, state_dict: dict, prefix: str) -> None:
        """A state saved before ``scale_at`` and ``slope`` existed loads with the current (zero) ones."""
        for name in ("scale_at", "slope"):
            state_dict.setdefault(prefix + name, getattr(self.owner, name))


class MemoryBank:
    """``estimator="memory"``: the latest features of every item, the table the current anchors are scanned against.

    Buffers registered on the loss: ``bank`` (2, N, d), rows 0 and 1 the a and b features of each item as last
    written (allocated at the first write, d from the features; (0,) before); ``in_bank`` (N,) bool, the rows
    written; ``bank_step`` () the loss's step at the last full ``refresh`` (-1: never). A batch writes the mean of
    the rows of each of its items; the anchors see the bank rows of the other items, never their own (which enter
    fresh from the batch). Cost: 2 N d floats; a scan of B anchors against it B N d multiply-adds.
    """

    def __init__(self, owner: GammaContrastiveLoss):
        self.owner = owner
        owner.register_buffer("bank", torch.empty(0))
        owner.register_buffer("in_bank", torch.zeros(owner.dataset_size, dtype=torch.bool))
        owner.register_buffer("bank_step", torch.full((), -1, dtype=torch.long))

    def allocate(self, a: Tensor) -> None:
        """Allocate the bank for features like ``a`` (B, d) (zeros, a's dtype and device) if it is not yet, and
        check their dimension."""
        owner = self.owner
        if owner.bank.numel() == 0:
            owner.bank = torch.zeros(2, owner.dataset_size, a.shape[1], dtype=a.dtype, device=a.device)
        if owner.bank.shape[-1] != a.shape[1]:
            raise ValueError(f"the memory bank holds features of dim {owner.bank.shape[-1]}, got dim {a.shape[1]}")

    def refresh(self, a: Tensor, b: Tensor) -> None:
        """Write every item's features ``a``, ``b`` (N, d) and record the loss's current step in ``bank_step``."""
        owner = self.owner
        self.allocate(a)
        owner.bank[0].copy_(a)
        owner.bank[1].copy_(b)
        owner.in_bank.fill_(True)
        owner.bank_step.fill_(int(owner.step))

    def write(self, unique: Tensor, inverse: Tensor, a: Tensor, b: Tensor, ok: Tensor) -> Tensor:
        """Write the batch's features ``a``, ``b`` (B, d) into the rows of its items ``unique`` (U,) (``inverse``
        (B,): each row's position in it), the mean of an item's rows where it is duplicated, for the items where
        ``ok`` (U,) and the mean is finite. Returns the mask of the items written (U,)."""
        owner = self.owner
        features = torch.stack([a, b])  # (2, B, d)
        means = owner.reduce_duplicates(unique, inverse, features.transpose(1, 2), log_space=False).transpose(1, 2)
        ok = ok & torch.isfinite(means).all(-1).all(0)
        owner.bank[:, unique[ok]] = means[:, ok].to(owner.bank.dtype)
        owner.in_bank[unique[ok]] = True
        return ok

    def table(self, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(table_a, table_b, usable): the bank's rows (N, d) in ``a``'s dtype and ``in_bank`` (N,), for the
        ``memory`` E-step of the batch ``a`` (B, d) (the bank allocated at the first call)."""
        self.allocate(a)
        # ``.data``: the bank rows of this batch are rewritten before backward, which autograd
        # would refuse; those rows are masked out of the table terms (weight 0), so the
        # gradient does not depend on them.
        bank = self.owner.bank.data
        return bank[0].to(a.dtype), bank[1].to(a.dtype), self.owner.in_bank

    def refreshed_table(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The bank's rows (N, d) in ``dtype`` if ``refresh`` wrote them at the loss's current step, else None."""
        owner = self.owner
        if owner.bank.numel() and int(owner.bank_step) == int(owner.step):
            return owner.bank[0].to(dtype), owner.bank[1].to(dtype)
        return None

    def estimate(self, a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
        """log Zhat (2, N) the E-step would use now for every item of a snapshot ``a``, ``b`` (N, d): the snapshot's
        anchor and positive against the bank rows written of the other items (their negatives)::

            Zhat_i = 1/n exp(s_ii) + (n-1)/n mean_{j in bank, j != i} exp(scale <a_i, bank_j>)
        """
        owner = self.owner
        n = owner.candidate_count
        bank, in_bank = owner.bank, owner.in_bank
        everyone = torch.arange(owner.dataset_size, device=a.device)
        tables = ((bank[1],), (bank[0],)) if owner.mode == "bimodal" else ((bank[1], bank[0]), (bank[0], bank[1]))
        scans = [scan_tables((a, b)[d], tables[d], None, in_bank, scale, owner.chunk_size, everyone) for d in range(2)]
        lse, count = torch.stack([s[0] for s in scans]), torch.stack([s[1] for s in scans])
        log_neg = lse - count.clamp(min=1).log() + math.log((n - 1) / n)
        positive = scale * (a * b).sum(1)
        return torch.logaddexp(positive[None, :] - math.log(n), log_neg)

    def before_load(self, state_dict: dict, prefix: str) -> None:
        """A state saved before ``in_bank`` and ``bank_step`` existed loads with the current ones; a saved bank of
        another shape replaces an unallocated one (or an allocated one by an empty one) before loading."""
        owner = self.owner
        for name in ("in_bank", "bank_step"):
            state_dict.setdefault(prefix + name, getattr(owner, name))
        saved_bank = state_dict.get(prefix + "bank")
        if saved_bank is not None and saved_bank.shape != owner.bank.shape:
            if owner.bank.numel() == 0 or saved_bank.numel() == 0:
                owner.bank = torch.empty(saved_bank.shape, dtype=saved_bank.dtype, device=owner.log_z.device)


class ExactTable:
    """``estimator="exact"``: the table is every item's features under the current model, so the rate is exact::

        Z_i = 1/n sum_{j candidate of i} exp(scale <a_i, T_j>)

    with T (N, d) the b features for the anchors a and the a features for the anchors b (bimodal), or both less
    the anchor itself (unimodal). The rows come from ``candidates=(all_a, all_b)`` at each call, or from the memory
    bank refreshed at the current step (``refresh_bank``). No state of its own. Small N only.
    """

    def __init__(self, owner: GammaContrastiveLoss):
        self.owner = owner

    def table(self, a: Tensor, candidates: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, None]:
        """(table_a, table_b, None) (N, d) each, for the E-step of the batch ``a`` (B, d): the checked (normalised)
        ``candidates``, or the bank refreshed at this step; None: every row is current."""
        owner = self.owner
        if candidates is None:
            refreshed = owner.memory_bank.refreshed_table(a.dtype)
            if refreshed is not None:
                return refreshed[0], refreshed[1], None
            raise ValueError(
                "estimator='exact' needs candidates=(features_a, features_b) of all "
                f"{owner.dataset_size} items computed with the current model, or refresh_bank() before each step"
            )
        with torch.no_grad():
            table_a, table_b = prepare_pair(*candidates, owner.normalize)
        if table_a.shape != (owner.dataset_size, a.shape[1]):
            raise ValueError(
                f"candidates must have shape ({owner.dataset_size}, {a.shape[1]}) (dataset_size, dim), "
                f"got {tuple(table_a.shape)}"
            )
        return table_a.to(a.device), table_b.to(a.device), None

    def log_partition(self, a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
        """The exact log Z (2, N) of every item of the features ``a``, ``b`` (N, d) (normalised), at scale ``scale``,
        scanned ``chunk_size`` table rows at a time."""
        owner = self.owner
        everyone = torch.arange(owner.dataset_size, device=a.device)
        tables = ((b,), (a,)) if owner.mode == "bimodal" else ((b, a), (a, b))
        lse = torch.stack([scan_tables((a, b)[d], tables[d], None, None, scale, owner.chunk_size, everyone)[0]
                           for d in range(2)])
        positive = scale * (a * b).sum(1)
        # The scan left out row i of every table: the anchor itself (unimodal) and its partner, which
        # is a candidate (the positive): add the partner back.
        return torch.logaddexp(lse, positive[None, :]) - math.log(owner.candidate_count)


class TableRates:
    """The E-step rate log Zhat (2, B) of a batch from a table T (``exact`` or ``memory``), and its M-step terms.

    With neg(i) the negatives of anchor i: the batch's, fresh, and the table rows of the other items (only those
    written, for the memory bank; a random ``memory_candidates`` of them per step, if set)::

        Zhat_i = 1/n exp(s_ii) + (n-1)/n mean_{j in neg(i)} exp(scale <a_i, T_j>)

    ``anchor_gradient="batch"``: the single M-step term Zbatch_i (the E-step uses the table only). ``"table"``: the
    terms are Zhat_i itself, with gradient to a_i and the scale only (the positive fully), and the batch
    negatives' sum with gradient to the candidates only (``one_side``).
    """

    def __init__(self, owner: GammaContrastiveLoss):
        self.owner = owner

    def estimate(
        self, batch: PairBatch, a: Tensor, b: Tensor, scale: Tensor, log_zbatch: Tensor,
        table_a: Tensor, table_b: Tensor, seen: Tensor | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """(log Zhat (2, B) without gradient, the M-step terms log Z_x (2, B)) for the batch of features ``a``,
        ``b`` (B, d) and its logits ``batch``, ``log_zbatch`` (2, B) its differentiable estimate, ``table_a``,
        ``table_b`` (N, d) and ``seen`` (N,) the rows written (None: all). Draws the sampled rows from the loss's
        generator."""
        owner = self.owner
        size = owner.dataset_size
        n = owner.candidate_count
        log_neg_weight = math.log((n - 1) / n)
        columns = None  # every table row
        if seen is not None and owner.memory_candidates is not None and owner.memory_candidates < size:
            columns = torch.randint(size, (owner.memory_candidates,), generator=owner._generator).to(a.device)
        usable = torch.ones(size, dtype=torch.bool, device=a.device) if seen is None else seen.clone()
        usable[batch.index] = False  # the batch's own candidates enter fresh, from the batch
        split = owner.anchor_gradient == "table" and torch.is_grad_enabled()

        # Tables each anchor direction contrasts with: bimodal a->[b], b->[a]; unimodal a,b->[b,a].
        anchors = (a, b)
        tables = ((table_b,), (table_a,)) if owner.mode == "bimodal" else ((table_b, table_a), (table_a, table_b))
        with torch.set_grad_enabled(split):
            scans = [scan_tables(anchors[d], tables[d], columns, usable, scale, owner.chunk_size) for d in range(2)]
            lse_table = torch.stack([scan[0] for scan in scans])
            n_table = torch.stack([scan[1] for scan in scans])
            anchor_side = one_side(batch, a, b, scale, anchor=True) if split else batch
            n_neg = batch.negative_counts()
            lse_batch = anchor_side.log_partition(0.0, 1.0) + n_neg.log()
            log_neg = torch.logaddexp(lse_table, lse_batch) - (n_table + n_neg).log()
            log_anchor = torch.logaddexp(batch.log_partition(1.0, 0.0) - math.log(n), log_neg + log_neg_weight)
        log_zhat = log_anchor.detach()
        if not split:
            return log_zhat, [log_zbatch]
        candidate_side = one_side(batch, a, b, scale, anchor=False)
        log_candidates = candidate_side.log_partition(0.0, (n - 1.0) / n)
        return log_zhat, [log_anchor, log_candidates]


def scan_tables(
    anchors: Tensor, tables: tuple[Tensor, ...], columns: Tensor | None, usable: Tensor | None, scale: Tensor, chunk: int,
    anchor_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(B,) log-sum-exp of scale * <anchor, T_j>, and the count, over the ``usable`` (None: all)
    table rows j among ``columns`` (None: all), ``chunk`` rows at a time: O(B * chunk) memory.
    With ``anchor_index`` (B,), the row j = anchor_index of every table is left out."""
    size = anchors.shape[0]
    lse, count = anchors.new_full((size,), -math.inf), anchors.new_zeros(size)
    total = tables[0].shape[0] if columns is None else columns.numel()
    for table in tables:
        for start in range(0, total, chunk):
            if columns is None:
                cols = torch.arange(start, min(start + chunk, total), device=anchors.device)
            else:
                cols = columns[start:start + chunk]
            rows = table[start:start + chunk] if columns is None else table[cols]
            ok = torch.ones(cols.shape, dtype=torch.bool, device=anchors.device) if usable is None else usable[cols]
            ok = ok[None, :].expand(size, -1)
            if anchor_index is not None:
                ok = ok & (cols[None, :] != anchor_index[:, None])
            logits = (scale * (anchors @ rows.T)).masked_fill(~ok, -math.inf)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            count = count + ok.sum(dim=1)
    return lse, count


def one_side(batch: PairBatch, a: Tensor, b: Tensor, scale: Tensor, anchor: bool) -> PairBatch:
    """The batch's logits with gradient to one side only: the anchor's (and the scale) if
    ``anchor``, else the candidates'. Direction 0 reads rows, direction 1 columns (bimodal).
    A chunked batch: the same through the blockwise kernel (``PairBatch.one_side``)."""
    if batch.chunked:
        return batch.one_side(anchor)
    if batch.mode == "unimodal":
        views = torch.cat([a, b])
        logits = scale * (views @ views.detach().T) if anchor else scale.detach() * (views.detach() @ views.T)
        return batch.with_logits(logits, logits)
    rows = a @ b.detach().T if anchor else a.detach() @ b.T  # direction 0: anchors a_r are rows
    columns = a.detach() @ b.T if anchor else a @ b.detach().T  # direction 1: anchors b_c are columns
    factor = scale if anchor else scale.detach()
    return batch.with_logits(factor * rows, factor * columns)
