"""The decomposable contrastive loss: gamma-augmented InfoNCE optimised by stochastic EM.

Chen et al., "Why do We Need Large Batch Sizes in Contrastive Learning? A Gradient-Bias
Perspective", NeurIPS 2022; DESIGN.md section 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plait._checks import is_int
from plait.losses._batch import PairBatch
from plait.losses._inputs import check_mode, check_temperature, prepare_pair, resolve_scale
from plait.losses._logsumexp import CHUNK_ROWS, check_chunk_size
from plait.losses._state import PerSampleState
from plait.losses.estimators import EmaRates, ExactTable, MemoryBank, TableRates

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

    The rate estimate Zhat_i comes from ``estimator``, each a part in ``plait.losses.estimators``:

    - ``"memory"`` (``MemoryBank``): the *current* anchor against a bank of every item's latest features
      (``memory_candidates`` random bank rows per step instead of all N, if set); only the
      negatives are stale, never the anchor, and the logit scale is applied at its current
      value. The bank costs 2 N d floats and B N d multiply-adds per step.
    - ``"ema"`` (``EmaRates``): a per-item exponential moving average of Zbatch_i over the item's visits, in
      log space: the first visit copies the batch estimate, later ones take weight gamma_k on it, with
      gamma_k = ``gamma`` (default 0.5; ``gamma_decay_visits=0``) or a cosine decay from 1 at the first
      visit to ``gamma`` after ``gamma_decay_visits`` visits (FastCLIP's schedule, per item). Each entry is
      carried from the logit scale it was computed at to the current one by its slope d log Z / d scale
      (first order; ``scale_correction=False``: not). O(N) floats of state.
    - ``"exact"`` (``ExactTable``): Z_i over all N items with the current model: pass
      ``candidates=(all_features_a, all_features_b)`` (N, d), or call ``refresh_bank`` with them
      before the step (what the trainer does when ``needs_candidates()``). Small N only.
    - ``"auto"`` (default): ``memory`` when its bank (2 N d float32) fits in ``bank_budget_mb``,
      else ``ema``; resolved at the first call, when d is known.

    With a table (``exact``, ``memory``), ``anchor_gradient="batch"`` (the default) uses the
    table for the E-step only; ``"table"`` also takes the anchor side of the M-step gradient
    (a_i and the logit scale) over every table candidate and only the candidate side (b_j)
    from the batch estimate (``TableRates``): unbiased and far less noisy with an exact table, but over a bank of
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
        _check_options(shape, estimator, gamma, gamma_decay_visits, bank_refresh_steps, memory_candidates, chunk_size,
                       anchor_gradient, bank_budget_mb, max_weight)
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
        # The E-step parts (plait.losses.estimators), each registering its buffers on this module, in
        # this order: scale_at, slope (ema); bank, in_bank, bank_step (memory bank, the exact table's too).
        self.ema_rates = EmaRates(self)
        self.memory_bank = MemoryBank(self)
        self.exact_table = ExactTable(self)
        self.table_rates = TableRates(self)

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
        self.memory_bank.refresh(a, b)

    def gamma_for(self, visit: Tensor) -> Tensor:
        """gamma_k, the weight of the newest batch estimate at the k-th visit (k >= 2) (``EmaRates.gamma_for``)."""
        return self.ema_rates.gamma_for(visit)

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
            bank_features = self._bank_features(bank_features, a, estimator)
        if candidates is not None and estimator != "exact":
            raise ValueError(f"candidates= is only used by estimator='exact', not {estimator!r}")
        n = self.candidate_count
        slope = None
        if estimator == "ema":
            log_zbatch, mean_logit = batch.log_partition(1.0 / n, (n - 1.0) / n, means=True)
            slope = mean_logit / scale.detach()  # d log Zbatch / d scale: the weighted mean cosine
            log_zhat = self.ema_rates.estimate(index, scale.detach(), log_zbatch.detach())
            terms = [log_zbatch]
        else:
            log_zbatch = batch.log_partition(1.0 / n, (n - 1.0) / n)  # (2, B), differentiable
            table = self.exact_table.table(a, candidates) if estimator == "exact" else self.memory_bank.table(a)
            log_zhat, terms = self.table_rates.estimate(batch, a, b, scale, log_zbatch, *table)

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

    def _bank_features(self, bank_features: tuple[Tensor, Tensor], a: Tensor, estimator: str) -> tuple[Tensor, Tensor]:
        """The checked (normalised) ``bank_features`` (B, d) each, on ``a``'s device."""
        if estimator != "memory":
            raise ValueError(f"bank_features= is only used by estimator='memory', not {estimator!r}")
        with torch.no_grad():
            bank_a, bank_b = prepare_pair(*bank_features, self.normalize)
        if bank_a.shape != a.shape:
            raise ValueError(f"bank_features must have the features' shape {tuple(a.shape)}, got {tuple(bank_a.shape)}")
        return bank_a.to(a.device), bank_b.to(a.device)

    def _ema_estimate(self, index: Tensor, scale: Tensor, log_zbatch: Tensor) -> Tensor:
        """The stored rate carried to the current scale; the batch estimate on a first visit (``EmaRates.estimate``)."""
        return self.ema_rates.estimate(index, scale, log_zbatch)

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
        """Write the new estimates of the batch's items, only where they are finite (with the memory bank:
        and where the written features are)."""
        unique, inverse = batch.unique, batch.inverse
        if estimator == "ema":
            new, ok = self.ema_rates.update(unique, inverse, log_zbatch, slope, scale)
        else:
            new = self.reduce_duplicates(unique, inverse, log_zhat, log_space=True)
            ok = torch.isfinite(new).all(0)
            if estimator == "memory":
                ok = self.memory_bank.write(unique, inverse, a, b, ok)
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
        truth = self.exact_table.log_partition(a, b, scale)
        if self.resolved_estimator(a.shape[1]) == "ema":
            have = self.visits > 0
            estimate = self.ema_rates.estimate(torch.arange(self.dataset_size, device=a.device), scale, truth)
        else:
            have = self.in_bank.clone()
            estimate = truth.clone() if self.bank.numel() == 0 else self.memory_bank.estimate(a, b, scale)
        result = {"batch_log_error": _batch_log_error(a, b, scale, truth, self.mode, self.candidate_count, batch_size, seed)}
        if have.any():
            diff = (estimate - truth)[:, have]
            result.update(staleness_log_error=float(diff.abs().mean()), staleness_log_bias=float(diff.mean()))
        return result

    # ---------------------------------------------------------------------------------- saving
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.rng_state = self._generator.get_state().to(self.rng_state.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self.ema_rates.before_load(state_dict, prefix)
        self.memory_bank.before_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "rng_state" in state_dict:
            self._generator.set_state(self.rng_state.cpu())

    def extra_repr(self) -> str:
        return (
            f"dataset_size={self.dataset_size}, temperature={self.temperature}, shape={self.shape}, "
            f"estimator={self.estimator!r}, gamma={self.gamma}, gamma_decay_visits={self.gamma_decay_visits}, "
            f"mode={self.mode!r}, anchor_gradient={self.anchor_gradient!r}, max_weight={self.max_weight}"
        )


def _batch_log_error(a: Tensor, b: Tensor, scale: Tensor, truth: Tensor, mode: str, n: int, batch_size: int, seed: int) -> float:
    """mean_i |log Zbatch_i - log Z_i| of the items ``a``, ``b`` (N, d) split into batches of ``batch_size`` by a
    permutation seeded with ``seed`` (a last batch of one row left out), ``truth`` (2, N) the exact log Z_i."""
    order = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(seed)).to(a.device)
    errors = []
    for chunk in order.split(batch_size):
        if chunk.numel() < 2:
            continue
        batch = PairBatch.build(a[chunk], b[chunk], scale, chunk, mode)
        errors.append((batch.log_partition(1.0 / n, (n - 1.0) / n) - truth[:, chunk]).abs().flatten())
    return float(torch.cat(errors).mean())


def _check_options(shape, estimator, gamma, gamma_decay_visits, bank_refresh_steps, memory_candidates, chunk_size,
                   anchor_gradient, bank_budget_mb, max_weight) -> None:
    """Raise ValueError for a constructor option of ``GammaContrastiveLoss`` out of its range."""
    if not (isinstance(shape, (int, float)) and shape > 0 and not math.isnan(shape)):
        raise ValueError(f"shape must be a positive number or float('inf'), got {shape!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    for name, value in (("gamma_decay_visits", gamma_decay_visits), ("bank_refresh_steps", bank_refresh_steps)):
        if not (is_int(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if memory_candidates is not None and not (is_int(memory_candidates) and memory_candidates >= 1):
        raise ValueError(f"memory_candidates must be a positive integer or None, got {memory_candidates!r}")
    if not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if anchor_gradient not in ANCHOR_GRADIENTS:
        raise ValueError(f"anchor_gradient must be one of {ANCHOR_GRADIENTS}, got {anchor_gradient!r}")
    if not (isinstance(bank_budget_mb, (int, float)) and bank_budget_mb >= 0):
        raise ValueError(f"bank_budget_mb must be a non-negative number, got {bank_budget_mb!r}")
    if not (isinstance(max_weight, (int, float)) and max_weight >= 1):
        raise ValueError(f"max_weight must be a number >= 1 (or float('inf')), got {max_weight!r}")
