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
    ``p_value`` of Welch's two-sided t-test (unequal variances); ``seeds_for_2se``: the seeds per
    cell at which a difference this large, with these spreads, would be 2 standard errors."""

    delta: float
    standard_error: float
    p_value: float
    seeds_for_2se: float

    @property
    def resolved(self) -> bool:
        """Beyond the seed noise: Welch p < 0.05."""
        return self.p_value < 0.05

    def describe(self) -> str:
        verdict = "beyond" if self.resolved else "within"
        text = f"{self.delta:+.1f} points +- {self.standard_error:.1f} (standard error), Welch p = {self.p_value:.2g}: {verdict} the seed noise"
        if not self.resolved and math.isfinite(self.seeds_for_2se):
            text += f"; about {math.ceil(self.seeds_for_2se)} seeds per cell would resolve a difference this size"
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
    seeds = 4 * (sa**2 + sb**2) / delta**2 if delta != 0.0 else math.inf
    return Difference(delta, se, p, seeds)
