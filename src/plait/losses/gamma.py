"""The decomposable contrastive loss: gamma-augmented InfoNCE optimised by stochastic EM.

Chen et al., "Why do We Need Large Batch Sizes in Contrastive Learning? A Gradient-Bias
Perspective", NeurIPS 2022; DESIGN.md section 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plait.losses._batch import PairBatch
from plait.losses._inputs import check_mode, check_temperature, prepare_pair
from plait.losses._state import PerSampleState

ESTIMATORS = ("ema", "exact", "memory")

# Cap on log(u_i * Zbatch_i), the weight of an anchor's candidates in the M-step gradient. With a
# fresh state the weight is about 1; only a badly stale rate estimate comes near e^30, and the
# cap keeps its gradient finite instead of overflowing to inf/NaN.
MAX_LOG_WEIGHT = 30.0


class GammaContrastiveLoss(PerSampleState):
    """Decomposable contrastive loss with per-anchor gamma auxiliary variables.

    The generalised loss of anchor i over all N dataset items (every item a candidate),
    with s_ij = scale * <a_i, b_j>::

        l_i = -s_ii + log Z_i,      Z_i = 1/N sum_j exp(s_ij)

    Gamma(1) Z^-1 = int exp(-u Z) du makes it linear in exp(s_ij) given u_i. Each step:

    - **E-step**: u_i ~ Gamma(shape, rate=shape * Zhat_i), so E[u_i] = 1/Zhat_i; ``shape=inf``
      gives u_i = 1/Zhat_i (SogCLR's deterministic estimator).
    - **M-step**: the gradient of mean_i [ -s_ii + u_i * Zbatch_i ], with the unbiased batch
      estimate (the positive weighted 1/N, not 1/B)::

          Zbatch_i = 1/N exp(s_ii) + (N-1)/N * mean_{j in batch, j != i} exp(s_ij)

    The rate estimate Zhat_i comes from ``estimator``:

    - ``"ema"``: a per-item moving average of Zbatch_i over the item's visits, in log space,
      with weight max(gamma, 1/visits) on the newest estimate (the first visit takes the batch
      estimate, then a running mean until 1/visits < gamma). The E-step reads the state of the
      earlier visits, so u_i is independent of this batch's negatives.
    - ``"exact"``: Z_i over all N items with the current model; pass
      ``candidates=(all_features_a, all_features_b)`` (N, d). The test reference; small N.
    - ``"memory"``: the current anchor against a bank of every item's latest features
      (``memory_candidates`` random bank entries per step instead of all N, if set); only the
      negatives are stale, never the anchor.

    With a table (``exact``, ``memory``), ``anchor_gradient="table"`` (the default) splits the
    M-step gradient of Z_i = sum_j w_j exp(s_ij) by where it flows: the anchor side (a_i and the
    logit scale) is taken over every table candidate (the batch's own candidates fresh), and only
    the candidate side (b_j) comes from the batch estimate. With an exact table both parts are
    unbiased, and at B = 4 the per-step gradient spread drops by an order of magnitude (E1).
    ``anchor_gradient="batch"`` uses the table for the E-step only.

    ``mode="bimodal"`` averages the directions a->b and b->a, as CLIP's loss does;
    ``mode="unimodal"`` is the NT-Xent form: each of the 2B views is an anchor whose candidates
    are the 2N - 1 other views of the dataset (N replaced by 2N - 1 above).

    The returned value is mean_i (-s_ii + log Zhat_i), the E-step's estimate of the generalised
    loss (equal to it for ``estimator="exact"``); its gradient is the M-step gradient. The
    per-sample state (see ``PerSampleState``) and the sampler's random state are buffers, so they
    are saved and restored with ``state_dict()``; the state changes only in training mode.

    Shapes: ``features_a``, ``features_b`` (B, d); ``index`` (B,) integer dataset indices;
    returns a scalar.
    """

    def __init__(
        self,
        dataset_size: int,
        temperature: float = 0.1,
        shape: float = float("inf"),
        estimator: str = "ema",
        gamma: float = 0.1,
        seed: int = 0,
        mode: str = "bimodal",
        normalize: bool = True,
        memory_candidates: int | None = None,
        anchor_gradient: str = "table",
        chunk_size: int = 16384,
    ):
        super().__init__(dataset_size)
        self.temperature = check_temperature(temperature)
        if not (isinstance(shape, (int, float)) and shape > 0 and not math.isnan(shape)):
            raise ValueError(f"shape must be a positive number or float('inf'), got {shape!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if memory_candidates is not None and (not isinstance(memory_candidates, int) or memory_candidates < 1):
            raise ValueError(f"memory_candidates must be a positive integer or None, got {memory_candidates!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.shape = float(shape)
        self.estimator = estimator
        self.gamma = float(gamma)
        self.mode = check_mode(mode)
        self.normalize = normalize
        self.memory_candidates = memory_candidates
        if anchor_gradient not in ("table", "batch"):
            raise ValueError(f"anchor_gradient must be 'table' or 'batch', got {anchor_gradient!r}")
        self.anchor_gradient = anchor_gradient
        self.chunk_size = chunk_size
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.register_buffer("rng_state", self._generator.get_state())
        # Memory bank (2, N, d) of the latest features of each item, allocated at the first call.
        self.register_buffer("bank", torch.empty(0))

    def forward(
        self,
        features_a: Tensor,
        features_b: Tensor,
        index: Tensor,
        logit_scale: Tensor | float | None = None,
        candidates: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        a, b, scale, batch = self.prepare_batch(features_a, features_b, index, logit_scale)
        index = batch.index
        n = self.candidate_count
        log_zbatch = batch.log_partition(1.0 / n, (n - 1.0) / n)  # (2, B): Zbatch, both sides differentiable

        table = self._table(a, candidates)
        if table is None:
            with torch.no_grad():
                first = (self.visits[index] == 0)[None, :]
                log_zhat = torch.where(first, log_zbatch.detach(), self.log_z[:, index].to(a.dtype))
            terms = [log_zbatch]
        else:
            log_zhat, terms = self._table_estimates(batch, a, b, scale, log_zbatch, *table)

        with torch.no_grad():
            log_u = self._draw_log_u(log_zhat)
            self.stats = {
                "state_age": self.state_age(index).float().mean(),
                "log_ratio": (log_zbatch.detach() - log_zhat).abs().mean(),
            }
            if self.training:
                self._update_state(batch, log_zbatch.detach(), log_zhat, a, b)

        # Value: -s_ii + log Zhat_i. Gradient: -grad s_ii + u_i * grad Z_x summed over the M-step
        # terms, written as u * Z_x * grad log Z_x so that nothing leaves log space.
        loss = log_zhat - batch.positive
        for log_zx in terms:
            weight = (log_u + log_zx.detach()).clamp(max=MAX_LOG_WEIGHT).exp()
            loss = loss + weight * (log_zx - log_zx.detach())
        return loss.mean()

    # ---------------------------------------------------------------------------------- E-step
    def _table(self, a: Tensor, candidates: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """(table_a, table_b, seen) of every item's features for the table estimators (seen=None:
        all rows are current), or None for ``ema``."""
        if candidates is not None and self.estimator != "exact":
            raise ValueError(f"candidates= is only used by estimator='exact', not {self.estimator!r}")
        if self.estimator == "ema":
            return None
        if self.estimator == "exact":
            if candidates is None:
                raise ValueError(
                    "estimator='exact' needs candidates=(features_a, features_b) of all "
                    f"{self.dataset_size} items, computed with the current model"
                )
            with torch.no_grad():
                table_a, table_b = prepare_pair(*candidates, self.normalize)
            if table_a.shape != (self.dataset_size, a.shape[1]):
                raise ValueError(
                    f"candidates must have shape ({self.dataset_size}, {a.shape[1]}) (dataset_size, dim), "
                    f"got {tuple(table_a.shape)}"
                )
            return table_a.to(a.device), table_b.to(a.device), None
        if self.bank.numel() == 0:
            self.bank = torch.zeros(2, self.dataset_size, a.shape[1], dtype=a.dtype, device=a.device)
        if self.bank.shape[-1] != a.shape[1]:
            raise ValueError(f"the memory bank holds features of dim {self.bank.shape[-1]}, got dim {a.shape[1]}")
        # ``.data``: the bank rows of this batch are rewritten before backward, which autograd
        # would refuse; those rows are masked out of the table terms (weight 0), so the
        # gradient does not depend on them.
        bank = self.bank.data
        return bank[0].to(a.dtype), bank[1].to(a.dtype), self.visits > 0

    def _table_estimates(
        self, batch: PairBatch, a: Tensor, b: Tensor, scale: Tensor, log_zbatch: Tensor,
        table_a: Tensor, table_b: Tensor, seen: Tensor | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """E-step rate log Zhat (2, B) from the table T, and the M-step terms log Z_x.

        With neg(i) the negatives of i: the batch's (fresh) and the table rows of the other
        items (only the seen ones for the memory bank, or a random subset of them)::

            Zhat_i = 1/n exp(s_ii) + (n-1)/n mean_{j in neg(i)} exp(scale <a_i, T_j>)

        ``anchor_gradient="table"``: the M-step terms are Zhat_i itself with gradient to a_i and the
        scale only (plus the positive, fully), and the batch negatives' sum with gradient to the
        candidates only. ``"batch"``: the single term Zbatch_i.
        """
        n = self.candidate_count
        log_neg_weight = math.log((n - 1) / n)
        columns = None  # every table row
        if self.estimator == "memory" and self.memory_candidates is not None and self.memory_candidates < self.dataset_size:
            columns = torch.randint(self.dataset_size, (self.memory_candidates,), generator=self._generator).to(a.device)
        usable = torch.ones(self.dataset_size, dtype=torch.bool, device=a.device) if seen is None else seen.clone()
        usable[batch.index] = False  # the batch's own candidates enter fresh, from the batch
        split = self.anchor_gradient == "table" and torch.is_grad_enabled()

        # Tables each anchor direction contrasts with: bimodal a->[b], b->[a]; unimodal a,b->[b,a].
        anchors = (a, b)
        tables = ((table_b,), (table_a,)) if self.mode == "bimodal" else ((table_b, table_a), (table_a, table_b))
        with torch.set_grad_enabled(split):
            scans = [_scan_tables(anchors[d], tables[d], columns, usable, scale, self.chunk_size) for d in range(2)]
            lse_table = torch.stack([scan[0] for scan in scans])
            n_table = torch.stack([scan[1] for scan in scans])
            anchor_side = _side(batch, a, b, scale, anchor=True) if split else batch
            n_neg = batch.negative_counts()
            lse_batch = anchor_side.log_partition(0.0, 1.0) + n_neg.log()
            log_neg = torch.logaddexp(lse_table, lse_batch) - (n_table + n_neg).log()
            log_anchor = torch.logaddexp(batch.log_partition(1.0, 0.0) - math.log(n), log_neg + log_neg_weight)
        log_zhat = log_anchor.detach()
        if not split:
            return log_zhat, [log_zbatch]
        candidate_side = _side(batch, a, b, scale, anchor=False)
        log_candidates = candidate_side.log_partition(0.0, (n - 1.0) / n)
        return log_zhat, [log_anchor, log_candidates]

    def _draw_log_u(self, log_zhat: Tensor) -> Tensor:
        """log u with u ~ Gamma(shape, rate = shape * Zhat), drawn from the loss's own generator."""
        if math.isinf(self.shape):
            return -log_zhat
        concentration = torch.full(log_zhat.shape, self.shape, dtype=torch.float32)
        draws = torch._standard_gamma(concentration, generator=self._generator)  # Gamma(shape, 1)
        return draws.to(device=log_zhat.device, dtype=log_zhat.dtype).log() - math.log(self.shape) - log_zhat

    # ---------------------------------------------------------------------------------- state
    def _update_state(self, batch: PairBatch, log_zbatch: Tensor, log_zhat: Tensor, a: Tensor, b: Tensor) -> None:
        unique, inverse = batch.unique, batch.inverse
        if self.estimator == "ema":
            fresh = self.reduce_duplicates(unique, inverse, log_zbatch, log_space=True)
            visits = (self.visits[unique] + 1).to(fresh.dtype)
            weight = torch.clamp(1.0 / visits, min=self.gamma)
            old = self.log_z[:, unique].to(fresh.dtype)
            new = torch.logaddexp(torch.log1p(-weight) + old, weight.log() + fresh)
            new = torch.where(visits == 1, fresh, new)
        else:
            new = self.reduce_duplicates(unique, inverse, log_zhat, log_space=True)
            if self.estimator == "memory":
                features = torch.stack([a, b])  # (2, B, d)
                means = self.reduce_duplicates(unique, inverse, features.transpose(1, 2), log_space=False)
                self.bank[:, unique] = means.transpose(1, 2).to(self.bank.dtype)
        self.log_z[:, unique] = new.to(self.log_z.dtype)
        self.record_visit(unique)

    # ---------------------------------------------------------------------------------- saving
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.rng_state = self._generator.get_state().to(self.rng_state.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved_bank = state_dict.get(prefix + "bank")
        if saved_bank is not None and saved_bank.shape != self.bank.shape:
            if self.bank.numel() == 0 or saved_bank.numel() == 0:
                self.bank = torch.empty(saved_bank.shape, dtype=saved_bank.dtype, device=self.log_z.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "rng_state" in state_dict:
            self._generator.set_state(self.rng_state.cpu())

    def extra_repr(self) -> str:
        return (
            f"dataset_size={self.dataset_size}, temperature={self.temperature}, shape={self.shape}, "
            f"estimator={self.estimator!r}, gamma={self.gamma}, mode={self.mode!r}"
        )


def _scan_tables(
    anchors: Tensor, tables: tuple[Tensor, ...], columns: Tensor | None, usable: Tensor, scale: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """(B,) log-sum-exp of scale * <anchor, T_j>, and the count, over the ``usable`` table rows j
    among ``columns`` (None: all), ``chunk`` rows at a time: O(B * chunk) memory without gradient."""
    size = anchors.shape[0]
    lse, count = anchors.new_full((size,), -math.inf), anchors.new_zeros(size)
    total = tables[0].shape[0] if columns is None else columns.numel()
    for table in tables:
        for start in range(0, total, chunk):
            if columns is None:
                rows, ok = table[start:start + chunk], usable[start:start + chunk]
            else:
                cols = columns[start:start + chunk]
                rows, ok = table[cols], usable[cols]
            logits = (scale * (anchors @ rows.T)).masked_fill(~ok[None, :], -math.inf)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            count = count + ok.sum()
    return lse, count


def _side(batch: PairBatch, a: Tensor, b: Tensor, scale: Tensor, anchor: bool) -> PairBatch:
    """The batch's logits with gradient to one side only: the anchor's (and the scale) if
    ``anchor``, else the candidates'. Direction 0 reads rows, direction 1 columns (bimodal)."""
    if batch.mode == "unimodal":
        views = torch.cat([a, b])
        logits = scale * (views @ views.detach().T) if anchor else scale.detach() * (views.detach() @ views.T)
        return batch.with_logits(logits, logits)
    rows = a @ b.detach().T if anchor else a.detach() @ b.T  # direction 0: anchors a_r are rows
    columns = a.detach() @ b.T if anchor else a @ b.detach().T  # direction 1: anchors b_c are columns
    factor = scale if anchor else scale.detach()
    return batch.with_logits(factor * rows, factor * columns)
