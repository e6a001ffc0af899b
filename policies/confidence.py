"""DeepConf's confidence measures over one generated trace (arXiv 2508.15260), pure functions shared by the
`deepconf` policy, CyberV's confidence options and `auto`.

- token confidence C_i = -(1/k) * sum over the k most likely tokens at position i of log P_i (high where the
  distribution is peaked); the engine's sensor measures it over the whole vocabulary (`ChoiceTokenStats`), an
  upstream without refine's plugin shows it through `top_logprobs` (`token_confidence_from_logprobs`);
- group confidence: the mean of C_i over a sliding window of the last `window` tokens, or over all tokens while
  fewer exist;
- a trace's lowest group confidence (the online mode's score and vote weight) and its tail confidence (the
  mean of the last window).

The engine's stop computes the same window means on the device; `group_confidences` is the reference the tests
hold it to. NaN entries (tokens the engine reported nothing for) are skipped, not counted as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Variant = Literal["low", "high"]
# DeepConf-low keeps the top 10% of warmup traces (threshold at the 90th percentile of their lowest group
# confidences), DeepConf-high the top 90% (the 10th percentile): the reproduce script's direction.
VARIANT_PERCENTILE: dict[Variant, float] = {"low": 90.0, "high": 10.0}


def token_confidence_from_logprobs(top_logprobs: Sequence[float], k: int) -> float:
    """C_i from the API's top alternatives at one position (their log probabilities, any order)."""
    top = sorted(top_logprobs, reverse=True)[:k]
    if not top:
        return math.nan
    return -sum(top) / len(top)


def group_confidences(confidences: Sequence[float], window: int) -> list[float]:
    """The group confidence after each token: entry i is the mean of C over tokens max(0, i-window+1)..i."""
    means: list[float] = []
    total, count = 0.0, 0
    for i, c in enumerate(confidences):
        if not math.isnan(c):
            total += c
            count += 1
        if i >= window and not math.isnan(confidences[i - window]):
            total -= confidences[i - window]
            count -= 1
        means.append(total / count if count else math.nan)
    return means


@dataclass(frozen=True)
class TraceConfidence:
    """What DeepConf reads off one trace."""

    lowest_group: float  # the minimum window mean, over windows that are full (all tokens while fewer exist)
    tail: float  # the mean of the last window
    mean: float  # the mean token confidence
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_group_confidence": _rounded(self.lowest_group),
            "tail_confidence": _rounded(self.tail),
            "mean_confidence": _rounded(self.mean),
        }


def trace_confidence(confidences: Sequence[float], window: int) -> TraceConfidence:
    """A trace's scores. As in the authors' code, windows count only once full: a trace shorter than `window`
    has one group, all of it."""
    means = group_confidences(confidences, window)
    full = [m for m in means[window - 1 :] if not math.isnan(m)] or [m for m in means[-1:] if not math.isnan(m)]
    known = [c for c in confidences if not math.isnan(c)]
    return TraceConfidence(
        lowest_group=min(full) if full else math.nan,
        tail=means[-1] if means else math.nan,
        mean=sum(known) / len(known) if known else math.nan,
        tokens=len(confidences),
    )


def threshold_from_warmup(lowest_groups: Sequence[float], variant: Variant) -> float:
    """The stop threshold s: a percentile of the warmup traces' lowest group confidences (linear
    interpolation between order statistics, numpy's default)."""
    values = sorted(v for v in lowest_groups if not math.isnan(v))
    if not values:
        raise ValueError("no warmup trace has a confidence")
    position = (len(values) - 1) * VARIANT_PERCENTILE[variant] / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(values) - 1)
    return values[lower] + (values[upper] - values[lower]) * (position - lower)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """The answer with the largest summed weight, and its share of all weight on answers (the consensus).
    Traces without an answer or with a non-positive or NaN weight do not vote. Ties: the first answer seen."""
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is None or math.isnan(weight) or weight <= 0:
            continue
        totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None, 0.0
    best = max(totals, key=lambda a: totals[a])  # max keeps the first of equal totals
    return best, totals[best] / sum(totals.values())


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)
