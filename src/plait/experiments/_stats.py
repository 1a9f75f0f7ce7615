"""Seed statistics for the experiment tables: mean +- std over seeds, and whether a difference of
two cells' means stands out of the seed noise (Welch's t-test)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of ``values``."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) over seeds; ``standard_error`` = sqrt(s_a^2 / n_a + s_b^2 / n_b);
    ``p_value`` of Welch's two-sided t-test (unequal variances); ``seeds_needed``: the fewest seeds
    per cell (both cells alike) at which a difference this large, with these spreads, would give
    Welch p < 0.05 (inf beyond 1,000 or for no difference)."""

    delta: float
    standard_error: float
    p_value: float
    seeds_needed: float

    @property
    def resolved(self) -> bool:
        """Beyond the seed noise: Welch p < 0.05."""
        return self.p_value < 0.05

    def describe(self) -> str:
        verdict = "beyond" if self.resolved else "within"
        text = (f"{self.delta:+.1f} points +- {self.standard_error:.1f} (standard error), "
                f"Welch p = {self.p_value:.2g}: {verdict} the seed noise")
        if not self.resolved and math.isfinite(self.seeds_needed):
            text += f"; about {int(self.seeds_needed)} seeds per cell would resolve a difference this size"
        return text


def difference(a, b) -> Difference:
    """Welch's test of mean(a) - mean(b) for two lists of per-seed values (at least 2 each)."""
    from scipy import stats

    a, b = list(a), list(b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a difference of means needs at least 2 seeds per cell, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    delta = ma - mb
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if se == 0.0:
        p = 1.0 if delta == 0.0 else 0.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Difference(delta, se, p, _seeds_needed(delta, sa**2, sb**2))


def _seeds_needed(delta: float, var_a: float, var_b: float, alpha: float = 0.05, most: int = 1000) -> float:
    """Fewest n (per cell) with Welch p < alpha for ``delta`` at these variances: t = delta / se,
    se^2 = (var_a + var_b) / n, Welch-Satterthwaite df = (var_a + var_b)^2 (n - 1) / (var_a^2 + var_b^2)."""
    import numpy as np
    from scipy import stats

    total = var_a + var_b
    if delta == 0.0:
        return math.inf
    if total == 0.0:
        return 2.0
    n = np.arange(2, most + 1)
    p = 2 * stats.t.sf(abs(delta) / np.sqrt(total / n), total**2 * (n - 1) / (var_a**2 + var_b**2))
    resolved = np.flatnonzero(p < alpha)
    return float(n[resolved[0]]) if resolved.size else math.inf
