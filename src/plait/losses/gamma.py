"""The decomposable contrastive loss: gamma-augmented InfoNCE optimised by stochastic EM.

Chen et al., "Why do We Need Large Batch Sizes in Contrastive Learning? A Gradient-Bias
Perspective", NeurIPS 2022; DESIGN.md section 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plait.losses._batch import PairBatch
from plait.losses._inputs import check_mode, check_temperature, prepare_pair, resolve_scale
from plait.losses._logsumexp import CHUNK_ROWS, check_chunk_size
from plait.losses._state import PerSampleState

ESTIMATORS = ("auto", "ema", "exact", "memory")
ANCHOR_GRADIENTS = ("batch", "table")


class GammaContrastiveLoss(PerSampleState):
    """Decomposable contrastive loss with per-anchor gamma auxiliary variables.

    The generalised loss of anchor i over all N dataset items (every item a candidate),
    with s_ij = scale * <a_i, b_j>::

        l_i = -s_ii + log Z_i,      Z_i = 1/N sum_j exp(s_ij)

    Gamma(1) Z^-1 = int exp(-u Z) du makes it linear in exp(s_ij) given u_i. Each step:

    - **E-step**: u_i ~ Gamma(shape, rate=shape * Zhat_i), so E[u_i] = 1/Zhat_i; ``shape=inf``
      gives u_i = 1/Zhat_i (SogCLR's deterministic estimator).
    - **M-step**: the gradient of mean_i [ -s_ii + min(u_i * Zbatch_i, max_weight) * log Zbatch_i ]
      (the weight detached), i.e. u_i * grad Zbatch_i with the weight bounded by ``max_weight``,
      and the unbiased batch estimate (the positive weighted 1/N, not 1/B)::

          Zbatch_i = 1/N exp(s_ii) + (N-1)/N * mean_{j in batch, j != i} exp(s_ij)

    The rate estimate Zhat_i comes from ``estimator``:

    - ``"memory"``: the *current* anchor against a bank of every item's latest features
      (``memory_candidates`` random bank rows per step instead of all N, if set); only the
      negatives are stale, never the anchor, and the logit scale is applied at its current
      value. The bank costs 2 N d floats and B N d multiply-adds per step.
    - ``"ema"``: a per-item exponential moving average of Zbatch_i over the item's visits, in log
      space: the first visit copies the batch estimate, later visits take weight gamma_k on it::

          log Zhat_i <- log( (1 - gamma_k) Zhat_i + gamma_k Zbatch_i )

      with gamma_k = ``gamma`` (default 0.5; ``gamma_decay_visits=0``) or a cosine decay from 1 at the first
      visit to ``gamma`` after ``gamma_decay_visits`` visits (FastCLIP's schedule, per item).
      Each entry stores the logit scale it was computed at and the slope d log Z / d scale
      (the softmax-weighted mean cosine); reading it at another scale applies the first-order
      correction log Z(s) = log Z(s0) + (s - s0) * slope (``scale_correction=False``: none).
      O(N) floats of state.
    - ``"exact"``: Z_i over all N items with the current model: pass
      ``candidates=(all_features_a, all_features_b)`` (N, d), or call ``refresh_bank`` with them
      before the step (what the trainer does when ``needs_candidates()``). Small N only.
    - ``"auto"`` (default): ``memory`` when its bank (2 N d float32) fits in ``bank_budget_mb``,
      else ``ema``; resolved at the first call, when d is known.

    With a table (``exact``, ``memory``), ``anchor_gradient="batch"`` (the default) uses the
    table for the E-step only; ``"table"`` also takes the anchor side of the M-step gradient
    (a_i and the logit scale) over every table candidate and only the candidate side (b_j)
    from the batch estimate: unbiased and far less noisy with an exact table, but over a bank of
    stale rows it pushes anchors away from where the candidates *were* (docs/losses.md).

    ``mode="bimodal"`` averages the directions a->b and b->a, as CLIP's loss does;
    ``mode="unimodal"`` is the NT-Xent form: each of the 2B views is an anchor whose candidates
    are the 2N - 1 other views of the dataset (N replaced by 2N - 1 above).

    ``batch_chunk_size``: the in-batch sums (Zbatch, the ema slope, the negatives of the table
    estimators, both sides of ``anchor_gradient="table"``) are computed from the features
    ``batch_chunk_size`` rows of the logit matrix at a time (``plait.losses._logsumexp.
    pair_logsumexp``), never forming the (B, B) (unimodal: (2B, 2B)) matrix: memory
    O(B * batch_chunk_size), the same values, gradients and state up to float rounding.
    Matrices of at most 256 rows (``DENSE_ROWS``: B <= 256 bimodal, B <= 128 unimodal) and
    ``batch_chunk_size=None`` use the dense logits. ``chunk_size`` is the rows of a table
    (``exact``, ``memory``) scanned at a time.

    The returned value is mean_i (-s_ii + log Zhat_i), the E-step's estimate of the generalised
    loss (equal to it for ``estimator="exact"``); its gradient is the M-step gradient. The
    per-sample state (see ``PerSampleState``), the bank and the sampler's random state are
    buffers, saved and restored with ``state_dict()``; the state changes only in training mode,
    and only for items whose new estimate is finite (a non-finite feature row poisons no state).

    Shapes: ``features_a``, ``features_b`` (B, d); ``index`` (B,) integer dataset indices;
    returns a scalar.
    """

    reads_candidates = True  # exact: every step; memory: every bank_refresh_steps (needs_candidates)
    reports_staleness = True

    def __init__(
        self,
        dataset_size: int,
        temperature: float = 0.1,
        shape: float = float("inf"),
        estimator: str = "auto",
        gamma: float = 0.5,
        gamma_decay_visits: int = 0,
        seed: int = 0,
        mode: str = "bimodal",
        normalize: bool = True,
        memory_candidates: int | None = None,
        anchor_gradient: str = "batch",
        bank_budget_mb: float = 256.0,
        bank_refresh_steps: int = 0,
        max_weight: float = 20.0,
        scale_correction: bool = True,
        chunk_size: int = 16384,
        batch_chunk_size: int | None = CHUNK_ROWS,
    ):
        super().__init__(dataset_size)
        self.temperature = check_temperature(temperature)
        if not (isinstance(shape, (int, float)) and shape > 0 and not math.isnan(shape)):
            raise ValueError(f"shape must be a positive number or float('inf'), got {shape!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        for name, value in (("gamma_decay_visits", gamma_decay_visits), ("bank_refresh_steps", bank_refresh_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if memory_candidates is not None and (not isinstance(memory_candidates, int) or memory_candidates < 1):
            raise ValueError(f"memory_candidates must be a positive integer or None, got {memory_candidates!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if anchor_gradient not in ANCHOR_GRADIENTS:
            raise ValueError(f"anchor_gradient must be one of {ANCHOR_GRADIENTS}, got {anchor_gradient!r}")
        if not (isinstance(bank_budget_mb, (int, float)) and bank_budget_mb >= 0):
            raise ValueError(f"bank_budget_mb must be a non-negative number, got {bank_budget_mb!r}")
        if not (isinstance(max_weight, (int, float)) and max_weight >= 1):
            raise ValueError(f"max_weight must be a number >= 1 (or float('inf')), got {max_weight!r}")
        self.shape = float(shape)
        self.estimator = estimator
        self.gamma = float(gamma)
        self.gamma_decay_visits = gamma_decay_visits
        self.mode = check_mode(mode)
        self.normalize = normalize
        self.memory_candidates = memory_candidates
        self.anchor_gradient = anchor_gradient
        self.bank_budget_mb = float(bank_budget_mb)
        self.bank_refresh_steps = bank_refresh_steps
        self.max_weight = float(max_weight)
        self.scale_correction = bool(scale_correction)
        self.chunk_size = chunk_size
        self.batch_chunk_size = check_chunk_size(batch_chunk_size)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.register_buffer("rng_state", self._generator.get_state())
        # ema: the logit scale each entry was computed at, and its slope d log Z / d scale.
        self.register_buffer("scale_at", torch.zeros(dataset_size))
        self.register_buffer("slope", torch.zeros(2, dataset_size))
        # Memory bank (2, N, d) of the latest features of each item, allocated at the first call;
        # ``in_bank`` marks the rows written; ``bank_step`` the step of the last full refresh.
        self.register_buffer("bank", torch.empty(0))
        self.register_buffer("in_bank", torch.zeros(dataset_size, dtype=torch.bool))
        self.register_buffer("bank_step", torch.full((), -1, dtype=torch.long))

    # ---------------------------------------------------------------------------------- estimator
    def resolved_estimator(self, dim: int) -> str:
        """``estimator`` with ``"auto"`` resolved for features of dimension ``dim``."""
        if self.estimator != "auto":
            return self.estimator
        bank_mb = 2 * self.dataset_size * dim * 4 / 2**20
        return "memory" if bank_mb <= self.bank_budget_mb else "ema"

    def uses_memory_bank(self, dim: int) -> bool:
        """Whether the E-step keeps a memory bank for features of dimension ``dim`` (``memory``)."""
        return self.resolved_estimator(dim) == "memory"

    def needs_candidates(self, dim: int) -> bool:
        """Whether the next step wants ``refresh_bank`` with every item's current features:
        always for ``exact``, every ``bank_refresh_steps`` steps for ``memory``."""
        estimator = self.resolved_estimator(dim)
        if estimator == "exact":
            return True
        return estimator == "memory" and self.bank_refresh_steps > 0 and int(self.step) % self.bank_refresh_steps == 0

    @torch.no_grad()
    def refresh_bank(self, features_a: Tensor, features_b: Tensor) -> None:
        """Write every item's features (N, d) into the bank (the ``exact`` table of this step)."""
        a, b = prepare_pair(features_a, features_b, self.normalize)
        if a.shape[0] != self.dataset_size:
            raise ValueError(f"refresh_bank needs the features of all {self.dataset_size} items, got {a.shape[0]} rows")
        self.check_device(a.device)
        self._ensure_bank(a)
        self.bank[0].copy_(a)
        self.bank[1].copy_(b)
        self.in_bank.fill_(True)
        self.bank_step.fill_(int(self.step))

    def _ensure_bank(self, a: Tensor) -> None:
        if self.bank.numel() == 0:
            self.bank = torch.zeros(2, self.dataset_size, a.shape[1], dtype=a.dtype, device=a.device)
        if self.bank.shape[-1] != a.shape[1]:
            raise ValueError(f"the memory bank holds features of dim {self.bank.shape[-1]}, got dim {a.shape[1]}")


    def forward(
        self,
        features_a: Tensor,
        features_b: Tensor,
        logit_scale: Tensor | float | None = None,
        *,
        index: Tensor,
        candidates: tuple[Tensor, Tensor] | None = None,
        bank_features: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``bank_features``: (B, d) features of the same views from another encoder (a momentum
        copy, as MoCo) to write into the memory bank instead of ``features_a``, ``features_b``."""
        a, b, scale, batch = self.prepare_batch(features_a, features_b, index, logit_scale, self.batch_chunk_size)
        index = batch.index
        estimator = self.resolved_estimator(a.shape[1])
        if bank_features is not None:
            if estimator != "memory":
                raise ValueError(f"bank_features= is only used by estimator='memory', not {estimator!r}")
            with torch.no_grad():
                bank_a, bank_b = prepare_pair(*bank_features, self.normalize)
            if bank_a.shape != a.shape:
                raise ValueError(f"bank_features must have the features' shape {tuple(a.shape)}, got {tuple(bank_a.shape)}")
            bank_features = (bank_a.to(a.device), bank_b.to(a.device))
        n = self.candidate_count
        slope = None
        if estimator == "ema":
            if candidates is not None:
                raise ValueError(f"candidates= is only used by estimator='exact', not {estimator!r}")
            log_zbatch, mean_logit = batch.log_partition(1.0 / n, (n - 1.0) / n, means=True)
            slope = mean_logit / scale.detach()  # d log Zbatch / d scale: the weighted mean cosine
            log_zhat = self._ema_estimate(index, scale.detach(), log_zbatch.detach())
            terms = [log_zbatch]
        else:
            log_zbatch = batch.log_partition(1.0 / n, (n - 1.0) / n)  # (2, B), differentiable
            table = self._table(a, candidates, estimator)
            log_zhat, terms = self._table_estimates(batch, a, b, scale, log_zbatch, *table)

        with torch.no_grad():
            log_u = self._draw_log_u(log_zhat)
            log_weights = [log_u + log_zx.detach() for log_zx in terms]
            log_cap = math.log(self.max_weight)
            self.stats = {
                "state_age": self.state_age(index).float().mean(),
                "log_ratio": (log_zbatch.detach() - log_zhat).abs().mean(),
                "weight_clamped": torch.stack([(w > log_cap).float().mean() for w in log_weights]).mean(),
            }
            if self.training:
                written = (a, b) if bank_features is None else bank_features
                self._update_state(batch, estimator, log_zbatch.detach(), log_zhat, slope, scale.detach(), *written)

        # Value: -s_ii + log Zhat_i. Gradient: -grad s_ii + u_i * grad Z_x summed over the M-step
        # terms, written as (u * Z_x) * grad log Z_x so that nothing leaves log space.
        loss = log_zhat - batch.positive
        for log_zx, log_weight in zip(terms, log_weights):
            loss = loss + log_weight.clamp(max=log_cap).exp() * (log_zx - log_zx.detach())
        return loss.mean()

    def _ema_estimate(self, index: Tensor, scale: Tensor, log_zbatch: Tensor) -> Tensor:
        """The stored rate carried to the current scale; the batch estimate on a first visit."""
        with torch.no_grad():
            first = (self.visits[index] == 0)[None, :]
            stored = self.log_z[:, index].to(log_zbatch.dtype)
            if self.scale_correction:
                stored = stored + (scale - self.scale_at[index].to(scale.dtype))[None, :] * self.slope[:, index].to(scale.dtype)
            return torch.where(first, log_zbatch, stored)

    def gamma_for(self, visit: Tensor) -> Tensor:
        """gamma_k, the weight of the newest batch estimate at the k-th visit (k >= 2)."""
        if self.gamma_decay_visits == 0:
            return torch.full(visit.shape, self.gamma, dtype=torch.float64, device=visit.device)
        progress = ((visit - 1).double() / self.gamma_decay_visits).clamp(0.0, 1.0)
        return self.gamma + (1.0 - self.gamma) * 0.5 * (1.0 + torch.cos(math.pi * progress))

    # ---------------------------------------------------------------------------------- E-step
    def _table(self, a: Tensor, candidates: tuple[Tensor, Tensor] | None, estimator: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(table_a, table_b, usable) of every item's features for the table estimators
        (usable=None: all rows are current)."""
        if candidates is not None and estimator != "exact":
            raise ValueError(f"candidates= is only used by estimator='exact', not {estimator!r}")
        if estimator == "exact":
            if candidates is None:
                if self.bank.numel() and int(self.bank_step) == int(self.step):
                    return self.bank[0].to(a.dtype), self.bank[1].to(a.dtype), None
                raise ValueError(
                    "estimator='exact' needs candidates=(features_a, features_b) of all "
                    f"{self.dataset_size} items computed with the current model, or refresh_bank() before each step"
                )
            with torch.no_grad():
                table_a, table_b = prepare_pair(*candidates, self.normalize)
            if table_a.shape != (self.dataset_size, a.shape[1]):
                raise ValueError(
                    f"candidates must have shape ({self.dataset_size}, {a.shape[1]}) (dataset_size, dim), "
                    f"got {tuple(table_a.shape)}"
                )
            return table_a.to(a.device), table_b.to(a.device), None
        self._ensure_bank(a)
        # ``.data``: the bank rows of this batch are rewritten before backward, which autograd
        # would refuse; those rows are masked out of the table terms (weight 0), so the
        # gradient does not depend on them.
        bank = self.bank.data
        return bank[0].to(a.dtype), bank[1].to(a.dtype), self.in_bank

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
        if seen is not None and self.memory_candidates is not None and self.memory_candidates < self.dataset_size:
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
    def _update_state(self, batch: PairBatch, estimator: str, log_zbatch: Tensor, log_zhat: Tensor,
                      slope: Tensor | None, scale: Tensor, a: Tensor, b: Tensor) -> None:
        """Write the new estimates of the batch's items, only where they are finite."""
        unique, inverse = batch.unique, batch.inverse
        if estimator == "ema":
            fresh = self.reduce_duplicates(unique, inverse, log_zbatch, log_space=True)
            fresh_slope = self.reduce_duplicates(unique, inverse, slope, log_space=False)
            first = self.visits[unique] == 0
            weight = self.gamma_for(self.visits[unique] + 1).to(fresh.dtype)
            old = self.log_z[:, unique].to(fresh.dtype)
            if self.scale_correction:  # the stored rate carried to the current scale
                old = old + (scale - self.scale_at[unique].to(fresh.dtype)) * self.slope[:, unique].to(fresh.dtype)
            new = torch.logaddexp(torch.log1p(-weight) + old, weight.log() + fresh)
            new = torch.where(first, fresh, new)
            new_slope = torch.where(first, fresh_slope, (1 - weight) * self.slope[:, unique].to(fresh.dtype) + weight * fresh_slope)
            ok = torch.isfinite(new).all(0) & torch.isfinite(new_slope).all(0) & torch.isfinite(scale)
            unique = unique[ok]
            self.slope[:, unique] = new_slope[:, ok].to(self.slope.dtype)
            self.scale_at[unique] = scale.to(self.scale_at.dtype)
        else:
            new = self.reduce_duplicates(unique, inverse, log_zhat, log_space=True)
            ok = torch.isfinite(new).all(0)
            if estimator == "memory":
                features = torch.stack([a, b])  # (2, B, d)
                means = self.reduce_duplicates(batch.unique, inverse, features.transpose(1, 2), log_space=False).transpose(1, 2)
                ok = ok & torch.isfinite(means).all(-1).all(0)
                self.bank[:, unique[ok]] = means[:, ok].to(self.bank.dtype)
                self.in_bank[unique[ok]] = True
            unique = unique[ok]
        self.log_z[:, unique] = new[:, ok].to(self.log_z.dtype)
        self.record_visit(unique)

    # ---------------------------------------------------------------------------------- staleness
    @torch.no_grad()
    def staleness(self, features_a: Tensor, features_b: Tensor, logit_scale: Tensor | float | None = None,
                  batch_size: int = 32, seed: int = 0) -> dict[str, float]:
        """How far the E-step's rate is from the truth on a frozen snapshot of all N items.

        With log Z_i the exact rate of every item under the snapshot (N, d) features:

        - ``staleness_log_error`` = mean_i |log Zhat_i - log Z_i| over the items with state,
          Zhat_i what the E-step would use now (the stored, scale-corrected ``ema`` entry; for a
          bank, the snapshot anchor against the bank rows): the error from staleness;
        - ``staleness_log_bias`` = mean_i (log Zhat_i - log Z_i);
        - ``batch_log_error`` = mean_i |log Zbatch_i - log Z_i| over a seeded partition of the
          items into batches of ``batch_size``: the noise of one fresh batch, for comparison.
        """
        a, b = prepare_pair(features_a, features_b, self.normalize)
        if a.shape[0] != self.dataset_size:
            raise ValueError(f"staleness needs the features of all {self.dataset_size} items, got {a.shape[0]} rows")
        scale = resolve_scale(logit_scale, self.temperature, a)
        n = self.candidate_count
        everyone = torch.arange(self.dataset_size, device=a.device)
        tables = ((b,), (a,)) if self.mode == "bimodal" else ((b, a), (a, b))
        truth = torch.stack([_scan_tables((a, b)[d], tables[d], None, None, scale, self.chunk_size, everyone)[0]
                             for d in range(2)])
        positive = scale * (a * b).sum(1)
        # The scan left out row i of every table: the anchor itself (unimodal) and its partner, which
        # is a candidate (the positive): add the partner back.
        truth = torch.logaddexp(truth, positive[None, :]) - math.log(n)
        estimator = self.resolved_estimator(a.shape[1])
        if estimator == "ema":
            have = self.visits > 0
            estimate = self._ema_estimate(everyone, scale, truth)
        else:
            have = self.in_bank.clone()
            if self.bank.numel() == 0:
                estimate = truth.clone()
            else:
                bank_tables = ((self.bank[1],), (self.bank[0],)) if self.mode == "bimodal" else ((self.bank[1], self.bank[0]), (self.bank[0], self.bank[1]))
                scans = [_scan_tables((a, b)[d], bank_tables[d], None, self.in_bank, scale, self.chunk_size, everyone) for d in range(2)]
                lse, count = torch.stack([s[0] for s in scans]), torch.stack([s[1] for s in scans])
                log_neg = lse - count.clamp(min=1).log() + math.log((n - 1) / n)
                estimate = torch.logaddexp(positive[None, :] - math.log(n), log_neg)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.dataset_size, generator=generator).to(a.device)
        errors = []
        for chunk in order.split(batch_size):
            if chunk.numel() < 2:
                continue
            batch = PairBatch.build(a[chunk], b[chunk], scale, chunk, self.mode)
            errors.append((batch.log_partition(1.0 / n, (n - 1.0) / n) - truth[:, chunk]).abs().flatten())
        result = {"batch_log_error": float(torch.cat(errors).mean())}
        if have.any():
            diff = (estimate - truth)[:, have]
            result.update(staleness_log_error=float(diff.abs().mean()), staleness_log_bias=float(diff.mean()))
        return result

    # ---------------------------------------------------------------------------------- saving
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.rng_state = self._generator.get_state().to(self.rng_state.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in ("scale_at", "slope", "in_bank", "bank_step"):  # state saved before these existed
            state_dict.setdefault(prefix + name, getattr(self, name))
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
            f"estimator={self.estimator!r}, gamma={self.gamma}, gamma_decay_visits={self.gamma_decay_visits}, "
            f"mode={self.mode!r}, anchor_gradient={self.anchor_gradient!r}, max_weight={self.max_weight}"
        )


def _scan_tables(
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
            cols = torch.arange(start, min(start + chunk, total), device=anchors.device) if columns is None else columns[start:start + chunk]
            rows = table[start:start + chunk] if columns is None else table[cols]
            ok = torch.ones(cols.shape, dtype=torch.bool, device=anchors.device) if usable is None else usable[cols]
            ok = ok[None, :].expand(size, -1)
            if anchor_index is not None:
                ok = ok & (cols[None, :] != anchor_index[:, None])
            logits = (scale * (anchors @ rows.T)).masked_fill(~ok, -math.inf)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            count = count + ok.sum(dim=1)
    return lse, count


def _side(batch: PairBatch, a: Tensor, b: Tensor, scale: Tensor, anchor: bool) -> PairBatch:
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
