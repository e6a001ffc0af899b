"""bench/stats.py: intervals and paired comparisons, on data whose answers are known."""

from __future__ import annotations

import pytest
from stats import Bootstrap, McNemar, mcnemar, median_interval, paired_bootstrap, ratio_interval, wilson


def test_wilson_interval() -> None:
    low, high = wilson(7, 10)
    assert low == pytest.approx(0.3968, abs=1e-4) and high == pytest.approx(0.8922, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and 0.0 < wilson(0, 20)[1] < 0.2
    assert wilson(20, 20)[1] == pytest.approx(1.0) and wilson(20, 20)[0] > 0.8
    assert wilson(0, 0) == (0.0, 1.0)


def test_identical_arms_do_not_differ() -> None:
    arm = [True, False, True, True, False] * 8
    assert mcnemar(arm, arm) == McNemar(1.0, 0, 0)
    assert paired_bootstrap(arm, arm) == Bootstrap(0.0, 0.0, 0.0)


def test_all_disagreements_one_way_is_significant() -> None:
    a = [False] * 12 + [True] * 20
    b = [True] * 12 + [True] * 20
    result = mcnemar(a, b)
    assert (result.b_only, result.a_only) == (12, 0)
    assert result.p_value == pytest.approx(2 * 0.5**12)
    assert mcnemar(b, a).p_value == result.p_value and mcnemar(b, a).a_only == 12
    boot = paired_bootstrap(a, b)
    assert boot.diff == pytest.approx(12 / 32) and 0 < boot.low < boot.diff < boot.high


def test_balanced_disagreements_are_not_significant() -> None:
    a = [True] * 5 + [False] * 5 + [True] * 10
    b = [False] * 5 + [True] * 5 + [True] * 10
    assert mcnemar(a, b) == McNemar(1.0, 5, 5)
    boot = paired_bootstrap(a, b)
    assert boot.diff == 0.0 and boot.low < 0 < boot.high


def test_paired_bootstrap_takes_per_item_averages_over_seeds_and_is_reproducible() -> None:
    a = [0.0, 1 / 3, 2 / 3, 1.0, 0.5, 0.25] * 5
    b = [min(1.0, x + 0.25) for x in a]
    boot = paired_bootstrap(a, b, reps=2000, seed=3)
    assert boot.diff == pytest.approx(sum(y - x for x, y in zip(a, b)) / len(a))
    assert 0 < boot.low <= boot.diff <= boot.high <= 0.25
    assert paired_bootstrap(a, b, reps=2000, seed=3) == boot


def test_arms_must_be_paired() -> None:
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_median_interval_brackets_the_median_by_order_statistics() -> None:
    values = [float(i) for i in range(400)]
    low, high = median_interval(values)
    assert low < 199.5 < high
    assert (low, high) == (180.0, 219.0)  # ranks n/2 -+ 1.96 sqrt(n) / 2
    assert median_interval([3.0]) == (3.0, 3.0)


def test_ratio_interval_resamples_clusters_whole() -> None:
    """Every item spends half of its full rounds: the ratio is 0.5 in every resample, however items vary."""
    full = [100.0, 100.0, 300.0, 300.0, 40.0, 40.0]
    items = ["a", "a", "b", "b", "c", "c"]
    assert ratio_interval([f / 2 for f in full], full, items, reps=500) == pytest.approx((0.5, 0.5))
    # Items that disagree widen it. Clustered, the 2 items are all there is to resample (each drawn twice in a
    # quarter of the resamples): the interval reaches both items' own ratios, where 20 rounds taken as
    # independent would bring it well in.
    spent, full = [10.0] * 10 + [90.0] * 10, [100.0] * 20
    low, high = ratio_interval(spent, full, ["a"] * 10 + ["b"] * 10, reps=2000)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.9)
    rounds_low, rounds_high = ratio_interval(spent, full, [str(i) for i in range(20)], reps=2000)
    assert 0.2 < rounds_low < 0.5 < rounds_high < 0.8
