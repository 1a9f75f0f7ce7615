"""plait.experiments._stats: Welch's test against a hand computation."""

import math

import pytest

from plait.experiments._stats import difference, mean_std


def test_mean_std_is_the_sample_standard_deviation():
    sample_std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, sample_std))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_welch_difference_by_hand():
    a, b = [8.0, 9.0, 10.0], [7.0, 7.5, 8.0, 8.5]
    # s_a^2 = 1, s_b^2 = 5/12; se = sqrt(1/3 + 5/48) = sqrt(21/48)
    d = difference(a, b)
    assert d.delta == pytest.approx(9.0 - 7.75)
    assert d.standard_error == pytest.approx(math.sqrt(21 / 48))
    # Welch-Satterthwaite df = (1/3 + 5/48)^2 / ((1/3)^2/2 + (5/48)^2/3); t = 1.25 / se
    df = (1 / 3 + 5 / 48) ** 2 / ((1 / 3) ** 2 / 2 + (5 / 48) ** 2 / 3)
    from scipy import stats

    assert d.p_value == pytest.approx(2 * stats.t.sf(1.25 / math.sqrt(21 / 48), df))
    # the fewest equal seed counts with p < 0.05 at these spreads, by hand: n = 5 gives p = 0.052, n = 6 p = 0.031
    for n, resolved in ((5, False), (6, True)):
        se_n = math.sqrt((1 + 5 / 12) / n)
        df_n = (1 + 5 / 12) ** 2 * (n - 1) / (1 + (5 / 12) ** 2)
        assert bool(2 * stats.t.sf(1.25 / se_n, df_n) < 0.05) == resolved
    assert d.seeds_needed == 6
    assert not d.resolved and "within the seed noise; about 6 seeds per cell" in d.describe()


def test_a_large_difference_is_resolved_and_too_few_seeds_refused():
    d = difference([18.0, 19.0, 20.0], [7.9, 8.0, 8.2])
    assert d.resolved and "beyond the seed noise" in d.describe() and "seeds per cell" not in d.describe()
    assert difference([1.0, 1.0], [0.0, 0.0]).p_value == 0.0
    with pytest.raises(ValueError, match="at least 2 seeds per cell, got 1 and 3"):
        difference([1.0], [1.0, 2.0, 3.0])
