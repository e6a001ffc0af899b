"""policies.confidence: DeepConf's measures, against brute-force recomputations of their definitions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from refine_server.policies.confidence import (
    group_confidences,
    threshold_from_warmup,
    token_confidence_from_logprobs,
    trace_confidence,
    weighted_vote,
)


def test_token_confidence_is_minus_the_mean_of_the_k_largest_logprobs_in_any_order() -> None:
    logprobs = [-3.0, -0.1, -2.0, -0.5]
    assert token_confidence_from_logprobs(logprobs, 2) == pytest.approx((0.1 + 0.5) / 2)
    assert token_confidence_from_logprobs(logprobs, 20) == pytest.approx((0.1 + 0.5 + 2.0 + 3.0) / 4)
    assert token_confidence_from_logprobs(list(reversed(logprobs)), 3) == token_confidence_from_logprobs(logprobs, 3)
    assert math.isnan(token_confidence_from_logprobs([], 20))


def _window_means(values: list[float], window: int) -> list[float]:
    """The definition, spelled out: entry i is the mean of the known values among the last `window`."""
    out = []
    for i in range(len(values)):
        known = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(known) / len(known) if known else math.nan)
    return out


@pytest.mark.parametrize("window", [1, 2, 5, 64])
def test_group_confidences_equal_the_window_means_nan_skipped(window: int) -> None:
    rng = random.Random(window)
    values = [math.nan if rng.random() < 0.1 else rng.uniform(0, 10) for _ in range(40)]
    expected = _window_means(values, window)
    got = group_confidences(values, window)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e)


def test_trace_confidence_counts_only_full_windows_and_a_short_trace_is_one_group() -> None:
    values = [5.0, 5.0, 1.0, 5.0, 5.0, 5.0]
    scores = trace_confidence(values, 3)
    # Full windows: [5,5,1], [5,1,5], [1,5,5], [5,5,5]; the partial window [5] (or [5,5]) does not count.
    assert scores.lowest_group == pytest.approx(11 / 3) and scores.tail == pytest.approx(5.0)
    assert scores.mean == pytest.approx(26 / 6) and scores.tokens == 6
    short = trace_confidence([4.0, 2.0], 64)
    assert short.lowest_group == short.tail == short.mean == pytest.approx(3.0)
    assert math.isnan(trace_confidence([], 4).lowest_group)
    assert trace_confidence([math.nan, 2.0, math.nan], 64).lowest_group == pytest.approx(2.0)


@pytest.mark.parametrize("count", [1, 2, 4, 5, 16])
def test_threshold_is_numpys_percentile_in_the_reproduce_scripts_direction(count: int) -> None:
    rng = random.Random(count)
    values = [rng.uniform(5, 20) for _ in range(count)]
    assert threshold_from_warmup(values, "low") == pytest.approx(float(np.percentile(values, 90)))
    assert threshold_from_warmup(values, "high") == pytest.approx(float(np.percentile(values, 10)))
    if count > 1:
        # low keeps the top 10%: its threshold is the stricter one.
        assert threshold_from_warmup(values, "low") > threshold_from_warmup(values, "high")
    with pytest.raises(ValueError):
        threshold_from_warmup([math.nan], "low")


def test_weighted_vote_sums_weights_per_answer_and_reports_the_leaders_share() -> None:
    assert weighted_vote(["a", "b", "b"], [5.0, 2.0, 2.0]) == ("a", pytest.approx(5 / 9))
    assert weighted_vote(["a", "b", "b"], [1.0, 1.0, 1.0]) == ("b", pytest.approx(2 / 3))
    # No answer, a NaN or a non-positive weight: no vote. Ties: the answer seen first.
    assert weighted_vote([None, "a", "b", "c"], [9.0, 1.0, 1.0, math.nan]) == ("a", pytest.approx(0.5))
    assert weighted_vote(["a", "b"], [0.0, -1.0]) == (None, 0.0)
