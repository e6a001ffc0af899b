"""How sure the first answer was: five measures over its tokens, from the engine's sensor or the API's
`top_logprobs`. Pure functions; `policy.py` makes the call and decides.

Per token i of the answer (the distribution it was drawn from, at T = 1 for a greedy answer):
- C_i, DeepConf's token confidence: -(1/k) * sum of the log probabilities of the k most likely tokens (k = 20);
- H_i, the entropy in nats;
- M_i, the top-2 margin p_top1 - p_top2.

The signals (`Signal`), over the n tokens of the answer:
- `lowest_group_confidence`: DeepConf's online score, the lowest mean of C over a sliding window of `window`
  tokens, counting only full windows (a shorter answer has one group, all of it) (`confidence.trace_confidence`);
- `tail_confidence`: the mean of C over the last `window` tokens (all of them when fewer);
- `mean_entropy`, `max_entropy`: the mean and the largest H_i;
- `answer_margin`: the mean M_i over the tokens that wrote the answer the text gives (the span CyberV's
  extractor reads, `answer_extraction.extract_answer`); over every token when the text gives none.
Confidences and the margin are high where the model is sure, entropies low: `is_sure` compares each on its
own side. A signal that cannot be measured (an empty answer, tokens the engine reported nothing for) is NaN,
and NaN is never sure: when in doubt, auto escalates.

Sources. The engine's sensor measures all three over the whole vocabulary (`ChoiceTokenStats`). An upstream
without refine's plugin shows the top 20 alternatives per token: C_i is then exact (its k = 20 are the top 20),
M_i exact (the top two are among them), and H_i is the entropy of the top 20 renormalised, a lower bound of
the true one (the trace's `sensor_source` says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from refine_server.policies.confidence import token_confidence_from_logprobs, trace_confidence

if TYPE_CHECKING:
    from refine_server.policies.token_stats import ChoiceTokenStats

Signal = Literal["lowest_group_confidence", "tail_confidence", "mean_entropy", "max_entropy", "answer_margin"]
SIGNALS: tuple[Signal, ...] = (
    "lowest_group_confidence",
    "tail_confidence",
    "mean_entropy",
    "max_entropy",
    "answer_margin",
)
SensorSource = Literal["engine", "top_logprobs"]
# The side a signal is sure on: True where at or above the threshold is sure, False where at or below.
SURE_WHEN_HIGH: dict[Signal, bool] = {
    "lowest_group_confidence": True,
    "tail_confidence": True,
    "mean_entropy": False,
    "max_entropy": False,
    "answer_margin": True,
}
CONFIDENCE_K = 20  # the k of C_i: the DeepConf authors' scripts, and the API's top_logprobs limit


@dataclass(frozen=True)
class ApiToken:
    """One generated token as the API's logprobs show it."""

    nbytes: int  # its UTF-8 length: maps the answer's characters to tokens
    top: list[float]  # the log probabilities of the top alternatives (empty when none were asked)


def api_tokens(choice: dict[str, Any]) -> list[ApiToken]:
    """The tokens of a chat or completions choice with logprobs (chat: `content` items; completions: the
    parallel `tokens` / `top_logprobs` lists)."""
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat
        return [
            ApiToken(
                len(item["bytes"]) if item.get("bytes") is not None else len(item["token"].encode()),
                [alt["logprob"] for alt in item.get("top_logprobs") or ()],
            )
            for item in logprobs["content"] or ()
        ]
    tops = logprobs.get("top_logprobs") or []
    return [
        ApiToken(len(token.encode()), list((tops[j] or {}).values()) if j < len(tops) else [])
        for j, token in enumerate(logprobs.get("tokens") or ())
    ]


@dataclass(frozen=True)
class Reading:
    """C_i, H_i and M_i of each token of the first answer, and where they were measured."""

    source: SensorSource
    nbytes: list[int]
    confidence: list[float]
    entropy: list[float]
    margin: list[float]

    @classmethod
    def from_engine(cls, stats: ChoiceTokenStats, tokens: Sequence[ApiToken]) -> Reading:
        """The sensor's measurements; `tokens` (the API's, without alternatives) place the answer's text."""
        n = len(stats.token_ids)
        nbytes = [t.nbytes for t in tokens] if len(tokens) == n else [0] * n
        confidence = stats.confidence if len(stats.confidence) == n else [math.nan] * n
        return cls("engine", nbytes, list(confidence), list(stats.entropy), list(stats.margin))

    @classmethod
    def from_api(cls, tokens: Sequence[ApiToken], k: int = CONFIDENCE_K) -> Reading:
        return cls(
            "top_logprobs",
            [t.nbytes for t in tokens],
            [token_confidence_from_logprobs(t.top, k) for t in tokens],
            [_renormalised_entropy(t.top) for t in tokens],
            [_margin(t.top) for t in tokens],
        )


def _renormalised_entropy(top: Sequence[float]) -> float:
    probs = [math.exp(lp) for lp in top]
    total = sum(probs)
    if not total:
        return math.nan
    return -sum(p / total * math.log(p / total) for p in probs if p > 0)


def _margin(top: Sequence[float]) -> float:
    probs = sorted((math.exp(lp) for lp in top), reverse=True)
    if not probs:
        return math.nan
    return probs[0] - (probs[1] if len(probs) > 1 else 0.0)


def tokens_of_span(text: str, nbytes: Sequence[int], start: int, end: int) -> list[int]:
    """The indices of the tokens that wrote text[start:end] (character offsets)."""
    first, last = len(text[:start].encode()), max(len(text[:end].encode()), len(text[:start].encode()) + 1)
    found, pos = [], 0
    for j, size in enumerate(nbytes):
        if pos < last and pos + size > first:
            found.append(j)
        pos += size
    return found


def measure(reading: Reading, answer_tokens: Sequence[int] | None, window: int) -> dict[Signal, float]:
    """Every signal of one answer; `answer_tokens`: the indices of its answer's tokens (None: all)."""
    scores = trace_confidence(reading.confidence, window)
    entropies = [h for h in reading.entropy if not math.isnan(h)]
    chosen = answer_tokens if answer_tokens else range(len(reading.margin))
    margins = [reading.margin[j] for j in chosen if not math.isnan(reading.margin[j])]
    return {
        "lowest_group_confidence": scores.lowest_group,
        "tail_confidence": scores.tail,
        "mean_entropy": sum(entropies) / len(entropies) if entropies else math.nan,
        "max_entropy": max(entropies) if entropies else math.nan,
        "answer_margin": sum(margins) / len(margins) if margins else math.nan,
    }


def is_sure(signal: Signal, value: float, threshold: float) -> bool:
    """Whether `value` is on the sure side of `threshold` (the threshold itself included); NaN never is."""
    if math.isnan(value):
        return False
    return value >= threshold if SURE_WHEN_HIGH[signal] else value <= threshold
