"""SogCLR, the per-sample moving-average baseline (Yuan et al., ICML 2022; LibAUC's GCLoss)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plait.losses._inputs import check_mode, check_temperature
from plait.losses._logsumexp import CHUNK_ROWS, check_chunk_size
from plait.losses._state import PerSampleState


class SogCLRLoss(PerSampleState):
    """SogCLR: the global contrastive loss optimised with a per-sample moving average.

    Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch
    Does Not Harm Performance", ICML 2022. With s_ij = scale * <a_i, b_j>, the objective is::

        F = mean_i log g_i,      g_i = epsilon + mean_{j in negatives of i} exp(s_ij - s_ii)

    (negatives: the n - 1 other candidates, n = N bimodal or 2N - 1 unimodal). With the default
    ``epsilon = 1/(n - 1)``, log g_i = l_i - log((n-1)/n): F is the generalised loss of
    :class:`GammaContrastiveLoss` up to a constant, so both chase the same optimum. (LibAUC's
    tiny epsilon drops the positive: the decoupled objective, whose optimum differs.) Per step,
    for the anchors in the batch (update, then use, as LibAUC does)::

        u_i <- (1 - gamma) u_i + gamma * gbatch_i        (the first visit takes gbatch_i)
        gradient: grad gbatch_i / u_i,    gbatch_i = epsilon + mean_{j in batch negatives} exp(s_ij - s_ii)

    It is the deterministic (shape -> inf) E-step with a moving-average rate, like
    ``GammaContrastiveLoss(shape=inf, estimator="ema")``, but tracking the positive-shifted g_i
    with a constant weight, updated before use. The state ``log_z`` holds log u_i per direction.
    The returned value is mean_i log u_i + log((n-1)/n), the estimate of the generalised loss.
    In training mode the state of an item is written, and its visit counted, only where its new
    log u_i is finite in both directions; a non-finite feature row leaves the state as it was (the
    returned value may then be NaN). A batch needs at least 2 pairs.

    ``chunk_size``: gbatch is computed from the features ``chunk_size`` rows of s at a time
    (``plait.losses._logsumexp.pair_logsumexp``), never forming the (B, B) (unimodal: (2B, 2B))
    matrix: memory O(B * chunk_size), the same value and gradient up to float rounding, and on CPU
    faster than the dense computation past a few hundred rows. Matrices of at most 256 rows
    (``DENSE_ROWS``; B <= 256 bimodal, B <= 128 unimodal), where plain autograd ops are as fast
    or faster, and ``chunk_size=None`` use the dense logits.

    Shapes: ``features_a``, ``features_b`` (B, d); ``index`` (B,); returns a scalar.
    """

    def __init__(
        self,
        dataset_size: int,
        gamma: float = 0.9,
        temperature: float = 0.1,
        mode: str = "bimodal",
        normalize: bool = True,
        epsilon: float | None = None,
        chunk_size: int | None = CHUNK_ROWS,
    ):
        super().__init__(dataset_size)
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.temperature = check_temperature(temperature)
        self.mode = check_mode(mode)
        self.normalize = normalize
        n = self.candidate_count
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise ValueError(f"epsilon must be a non-negative number or None, got {epsilon!r}")
        self.epsilon = 1.0 / (n - 1) if epsilon is None else float(epsilon)
        self._log_offset = math.log((n - 1) / n)
        self.chunk_size = check_chunk_size(chunk_size)


    def forward(
        self, features_a: Tensor, features_b: Tensor, logit_scale: Tensor | float | None = None, *, index: Tensor
    ) -> Tensor:
        """``logit_scale`` as open_clip's (the scale itself; None: 1/temperature); ``index`` (B,),
        keyword-only and required: the rows' dataset indices in [0, dataset_size)."""
        a, b, scale, batch = self.prepare_batch(features_a, features_b, index, logit_scale, self.chunk_size)
        index = batch.index
        log_gbatch = batch.log_partition(0.0, 1.0) - batch.positive  # (2, B)
        if self.epsilon > 0:
            log_gbatch = torch.logaddexp(log_gbatch, torch.tensor(math.log(self.epsilon), dtype=a.dtype, device=a.device))

        with torch.no_grad():
            unique, inverse = batch.unique, batch.inverse
            fresh = self.reduce_duplicates(unique, inverse, log_gbatch.detach(), log_space=True)
            old = self.log_z[:, unique].to(fresh.dtype)
            first = (self.visits[unique] == 0)[None, :]
            moved = torch.logaddexp(math.log1p(-self.gamma) + old, math.log(self.gamma) + fresh) if self.gamma < 1 else fresh
            log_u_unique = torch.where(first, fresh, moved)
            log_u = log_u_unique[:, inverse]
            self.stats = {
                "state_age": self.state_age(index).float().mean(),
                "log_ratio": (log_gbatch.detach() - log_u).abs().mean(),
            }
            if self.training:
                # Only items whose new estimate is finite are written and counted as visited: a
                # non-finite row (a NaN candidate reaches every anchor's estimate) keeps the old state.
                stored = log_u_unique.to(self.log_z.dtype)
                finite = torch.isfinite(stored).all(dim=0)
                self.log_z[:, unique] = torch.where(finite, stored, self.log_z[:, unique])
                self.record_visit(unique[finite])
            # gbatch / u <= (duplicates) / gamma after the update: no overflow.
            weight = (log_gbatch.detach() - log_u).exp()

        surrogate = weight * (log_gbatch - log_gbatch.detach())
        return (log_u + self._log_offset + surrogate).mean()

    def extra_repr(self) -> str:
        return (
            f"dataset_size={self.dataset_size}, gamma={self.gamma}, temperature={self.temperature}, "
            f"mode={self.mode!r}, epsilon={self.epsilon:.3g}, chunk_size={self.chunk_size}"
        )
