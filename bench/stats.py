"""Intervals and paired comparisons for benchmark accuracies.

- `wilson(k, n)`: the 95% Wilson interval of one arm's accuracy (sound at small n and near 0 or 1, where
  the normal approximation is not).
- `mcnemar(a, b)`: whether two arms graded on the same items differ, from the items they disagree on; the
  exact binomial test, since benchmark runs have few discordant items.
- `paired_bootstrap(a, b)`: the mean difference b - a with a 95% percentile interval, resampling items.
  Its inputs may be per-item averages over seeds (a sampled policy run with several seeds), where McNemar's
  test, which needs one right/wrong per item and arm, does not apply.
- `median_interval(values)`: a 95% interval for a median, from order statistics (bench/proxy.py's paired
  latency differences, whose shape is unknown).
- `ratio_interval(numerators, denominators, clusters)`: a 95% interval for a ratio of sums, resampling
  clusters (bench/stopping.py's tokens against self-consistency, an item's rounds resampled together).

Both paired comparisons take the arms item by item in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class McNemar:
    p_value: float
    b_only: int  # items b gets right and a gets wrong
    a_only: int  # items a gets right and b gets wrong


@dataclass(frozen=True)
class Bootstrap:
    diff: float  # mean of b - a over the items
    low: float
    high: float


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval for k successes in n trials; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact test: two-sided p-value that a and b are equally often right where they disagree."""
    _check_paired(a, b)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    discordant = b_only + a_only
    p_value = stats.binomtest(b_only, discordant, 0.5).pvalue if discordant else 1.0
    return McNemar(float(p_value), b_only, a_only)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], reps: int = 10_000, seed: int = 0) -> Bootstrap:
    """Mean of b - a and its 95% percentile bootstrap interval, resampling items (at least two).

    Each item is a score in [0, 1]: right/wrong, or the fraction of seeds an arm got it right.
    """
    _check_paired(a, b)
    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    result = stats.bootstrap((diffs,), np.mean, n_resamples=reps, method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return Bootstrap(float(diffs.mean()), float(interval.low), float(interval.high))


def median_interval(ordered: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A 95% interval for the median of sorted values, from order statistics (no assumption on their shape)."""
    n = len(ordered)
    half = z * n**0.5 / 2
    return ordered[max(0, int(n / 2 - half))], ordered[min(n - 1, int(n / 2 + half))]


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    clusters: Sequence[str],
    reps: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of sum(numerators) / sum(denominators), resampling clusters with
    replacement: the rounds of one item go together, since they share its difficulty."""
    index = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    rows = [index[c] for c in clusters]
    num, den = np.zeros(len(index)), np.zeros(len(index))
    np.add.at(num, rows, np.asarray(numerators, dtype=float))
    np.add.at(den, rows, np.asarray(denominators, dtype=float))
    picks = np.random.default_rng(seed).integers(0, len(index), size=(reps, len(index)))
    low, high = np.percentile(num[picks].sum(axis=1) / den[picks].sum(axis=1), [2.5, 97.5])
    return float(low), float(high)


def _check_paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired arms must grade the same items: {len(a)} against {len(b)}")
