"""CyberV's sensor and controller: pure functions over round 1's candidates (no engine calls).

What the engine wrote (`Generation`, with its per-token top logprobs), the signals s1..s5 read from it, the
official controller's gate, and the rule that judges a feedback answer. `policies/cyberv/policy.py` documents the
method and runs the loop, `policies/cyberv/stopping.py` decides when the adaptive round 1 may stop; the
constants below are the official code's values unless marked otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from refine_server.policies.answer_extraction import Answer
from refine_server.policies.confidence import TraceConfidence

if TYPE_CHECKING:
    from refine_server.policies.token_stats import ChoiceTokenStats

SIGNAL_WEIGHT = 0.2  # official: every beta_i is 0.2
CONFIDENCE_DROP = -0.5  # s2: relative drop of p_i against p_0 that zeroes the signal
REPEAT_LENGTH, REPEAT_TIMES = 15, 5  # s3: official substring length (15-29) and count
MARGIN_RATIO = 0.5  # s4 (refine's transfer to text): answer margin below this fraction of the direct answer's
SPAN_CHARS = 80  # feedback (refine's transfer to text): characters quoted on either side of the spike


# ---- what the engine wrote -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    text: str
    prob: float  # of the token drawn
    entropy: float  # nats: over the whole vocabulary (engine sensor) or the top alternatives, renormalised (API)
    margin: float  # p(top 1) - p(top 2): small where the model hesitated between two tokens
    nbytes: int  # UTF-8 length: maps tokens to text offsets even where a token ends inside a character

    @classmethod
    def from_logprobs(cls, item: dict[str, Any]) -> Token:
        """A token as the API's `top_logprobs` show it: the entropy of the top alternatives, renormalised,
        is all the API shows of the distribution."""
        top = sorted((alt["logprob"] for alt in item.get("top_logprobs") or ()), reverse=True) or [item["logprob"]]
        probs = [math.exp(lp) for lp in top]
        total = sum(probs)
        entropy = -sum(p / total * math.log(p / total) for p in probs if p > 0) if total > 0 else 0.0
        margin = probs[0] - (probs[1] if len(probs) > 1 else 0.0)
        return cls(item["token"], math.exp(item["logprob"]), entropy, margin, _nbytes(item))

    @classmethod
    def from_engine(cls, item: dict[str, Any], stats: ChoiceTokenStats, j: int) -> Token:
        """A token with the statistics the engine measured over the whole vocabulary (the API still gives its
        text). A token the engine reported nothing for falls back to what the API shows."""
        if math.isnan(stats.entropy[j]):
            return cls.from_logprobs(item)
        return cls(item["token"], stats.prob[j], stats.entropy[j], stats.margin[j], _nbytes(item))


def _nbytes(item: dict[str, Any]) -> int:
    raw = item.get("bytes")
    return len(raw) if raw is not None else len(item["token"].encode())


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[Token]
    finish_reason: str | None
    decoded: dict[str, Any] | None = None  # what an in-engine policy reported for it (cyberv's `decode`)
    # DeepConf's token confidences, where the engine measured them; and where its confidence stop ended the
    # generation (None: it did not).
    confidences: tuple[float, ...] = ()
    stopped_at: int | None = None

    @classmethod
    def from_choice(cls, choice: dict[str, Any], stats: ChoiceTokenStats | None = None) -> Generation:
        """A vLLM chat choice with its logprobs; with `stats`, each token carries the engine's measurements."""
        items = (choice.get("logprobs") or {}).get("content") or ()
        if stats is not None and len(stats.entropy) == len(items):
            tokens = [Token.from_engine(item, stats, j) for j, item in enumerate(items)]
        else:
            tokens = [Token.from_logprobs(item) for item in items]
        text = (choice.get("message") or {}).get("content") or ""
        if stats is None:
            return cls(text, tokens, choice.get("finish_reason"))
        return cls(
            text, tokens, choice.get("finish_reason"), confidences=tuple(stats.confidence), stopped_at=stats.stopped_at
        )

    def tokens_between(self, start: int, end: int) -> list[Token]:
        """The tokens that wrote text[start:end] (character offsets; an empty span: the token at `start`)."""
        first, last = len(self.text[:start].encode()), len(self.text[:end].encode())
        last = max(last, first + 1)
        found, pos = [], 0
        for token in self.tokens:
            if pos < last and pos + token.nbytes > first:
                found.append(token)
            pos += token.nbytes
        return found

    def offset_of(self, index: int) -> int:
        """Character offset in the text where token `index` begins."""
        nbytes = sum(t.nbytes for t in self.tokens[:index])
        return len(self.text.encode()[:nbytes].decode(errors="ignore"))


@dataclass(frozen=True)
class Spike:
    """A candidate's most uncertain token: where the feedback round asks the model to look again."""

    offset: int
    token: str
    entropy: float

    def trace(self) -> dict[str, Any]:
        return {"offset": self.offset, "token": self.token, "entropy": round4(self.entropy)}


def find_spike(generation: Generation) -> Spike | None:
    """The token of highest entropy, where the text is; None without per-token statistics."""
    if not generation.tokens:
        return None
    index = max(range(len(generation.tokens)), key=lambda i: generation.tokens[i].entropy)
    token = generation.tokens[index]
    return Spike(generation.offset_of(index), token.text, token.entropy)


# ---- candidates and the sensor ---------------------------------------------------------------------------


@dataclass
class Candidate:
    index: int
    kind: Literal["direct", "reasoning"]
    generation: Generation
    final: Generation | None = None  # the greedy final-answer step, when the text's own answer could not be read
    answer: Answer | None = None
    answer_source: Literal["own_text", "final_step", "unmarked_text"] | None = None
    answer_tokens: list[Token] = field(default_factory=list)
    spike: Spike | None = None
    signals: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    confidence: TraceConfidence | None = None  # DeepConf's scores, where the engine measured its confidences

    def take_answer(self, answer: Answer, source: Literal["own_text", "final_step", "unmarked_text"]) -> None:
        """Record the answer and the tokens that wrote it (in the final step or in the candidate's text)."""
        written = self.final if source == "final_step" else self.generation
        assert written is not None, "an answer from the final step comes with that step"
        self.answer, self.answer_source = answer, source
        self.answer_tokens = written.tokens_between(answer.start, answer.end)

    @property
    def completion_tokens(self) -> int:
        return len(self.generation.tokens) + (len(self.final.tokens) if self.final else 0)

    @property
    def p(self) -> float | None:
        """Probability of the answer's first token; None when the answer or its logprobs are missing."""
        return self.answer_tokens[0].prob if self.answer_tokens else None

    @property
    def answer_margin(self) -> float | None:
        """Mean top-2 margin over the tokens of the answer (s4); None when they are unknown."""
        if not self.answer_tokens:
            return None
        return sum(t.margin for t in self.answer_tokens) / len(self.answer_tokens)

    def trace(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "index": self.index,
            "kind": self.kind,
            "answer": self.answer.value if self.answer else None,
            "answer_kind": self.answer.kind if self.answer else None,
            "answer_source": self.answer_source,
            "signals": {name: round4(value) for name, value in self.signals.items()},
            "score": round4(self.score),
            "answer_margin": round4(self.answer_margin),
            "spike": self.spike.trace() if self.spike else None,
            "finish_reason": self.generation.finish_reason,
            "completion_tokens": self.completion_tokens,
        }
        if self.generation.decoded is not None:
            entry["decoded"] = {
                "generation": self.generation.decoded,
                "final_step": self.final.decoded if self.final else None,
            }
        if self.confidence is not None:
            entry["confidence"] = {
                **self.confidence.as_dict(),
                "stopped_low_confidence": self.generation.stopped_at is not None,
                "stopped_at": self.generation.stopped_at,
            }
        if self.generation.stopped_at is not None:
            entry["reason"] = "stopped for low confidence: no answer read"
        elif self.answer is None:
            entry["reason"] = "no extractable answer"
        return entry


def sense(candidates: list[Candidate], n: int) -> None:
    """Fill every candidate's signals s1..s5, score and uncertainty spike. Candidate 0 is the direct answer.

    s5 is the rank among the candidates drawn so far over `n`, the number round 1 may draw: while fewer are
    drawn, it is the least that s5 can become (a later candidate can only push a rank up), so every score is a
    lower bound of its final value (see `outlook`). With all n drawn it is the official s5.
    """
    direct = candidates[0]
    probs = [c.p or 0.0 for c in candidates]
    ranks = rank_ascending(probs)
    for c, p, rank in zip(candidates, probs, ranks):
        c.signals = {
            "s1": p,
            "s2": confidence_signal(p, probs[0]),
            "s3": 0.0 if has_repetition(c.generation.text) else 1.0,
            "s4": uncertainty_signal(c, direct),
            "s5": rank / n,
        }
        c.score = SIGNAL_WEIGHT * sum(c.signals.values())
        c.spike = find_spike(c.generation)


def confidence_signal(p: float, p_direct: float) -> float:
    """s2: 0 when p dropped by more than half against the direct answer's probability."""
    if p_direct <= 0:
        return 1.0
    return 0.0 if (p - p_direct) / p_direct < CONFIDENCE_DROP else 1.0


def has_repetition(text: str) -> bool:
    """s3's test: a 15-29 character substring occurs REPEAT_TIMES times or more, not overlapping.

    Checking length 15 is enough: where a longer substring occurs 5 times without overlap, so does its
    15-character prefix.
    """
    if len(text) <= 2 * REPEAT_LENGTH:  # the official code's floor
        return False
    windows = Counter(text[i : i + REPEAT_LENGTH] for i in range(len(text) - REPEAT_LENGTH + 1))
    return any(count >= REPEAT_TIMES and text.count(sub) >= REPEAT_TIMES for sub, count in windows.items())


def uncertainty_signal(candidate: Candidate, direct: Candidate) -> float:
    """s4: 0 when the candidate's answer was written much less decisively than the direct answer."""
    reference = direct.answer_margin
    if candidate is direct or reference is None:
        return 1.0
    own = candidate.answer_margin
    if own is None:
        return 0.0
    return 0.0 if own < MARGIN_RATIO * reference else 1.0


def rank_ascending(values: list[float]) -> list[int]:
    """1 for the smallest value ... len for the largest; ties ranked in list order (the official sort)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


# ---- the controller --------------------------------------------------------------------------------------


@dataclass
class Tally:
    answer: Answer
    score: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Decision:
    action: Literal["accepted", "feedback", "no_answer"]
    best: Candidate  # round 1's choice: the best-scoring candidate of the best answer, else the direct answer
    tallies: list[Tally]  # best first
    threshold: float
    reason: str


def decide(candidates: list[Candidate], threshold: float) -> Decision:
    """The official gate: accept the best answer if its summed score exceeds the threshold (n * theta)."""
    tallies = tally(candidates)
    if not tallies:
        return Decision(
            "no_answer",
            candidates[0],
            [],
            threshold,
            "no candidate has an extractable answer: returning the direct answer",
        )
    top = tallies[0]
    best = max(top.candidates, key=lambda c: c.score)
    if top.score > threshold:
        return Decision(
            "accepted",
            best,
            tallies,
            threshold,
            f"answer {top.answer} scored {top.score:.3f} > n*theta = {threshold:.3f}",
        )
    return Decision(
        "feedback",
        best,
        tallies,
        threshold,
        f"best answer {top.answer} scored {top.score:.3f} <= n*theta = {threshold:.3f}",
    )


def tally(candidates: list[Candidate]) -> list[Tally]:
    """Scores summed per answer, best first; on a tie the answer seen first wins, as in the official code."""
    by_answer: dict[Answer, Tally] = {}
    for c in candidates:
        if c.answer is not None:
            entry = by_answer.setdefault(c.answer, Tally(c.answer))
            entry.score += c.score
            entry.candidates.append(c)
    return sorted(by_answer.values(), key=lambda t: -t.score)


def quote_span(candidate: Candidate) -> str:
    """The text around the candidate's uncertainty spike (its end when it has no logprobs)."""
    text = candidate.generation.text
    centre = candidate.spike.offset if candidate.spike else len(text)
    start, end = max(0, centre - SPAN_CHARS), min(len(text), centre + SPAN_CHARS)
    return ("..." if start > 0 else "") + text[start:end].strip() + ("..." if end < len(text) else "")


# ---- the feedback round ----------------------------------------------------------------------------------


@dataclass
class Feedback:
    candidate: int  # the round-1 candidate whose spike was quoted
    span: str
    rechecked: Candidate  # the feedback round's generation, its answer read as a round-1 candidate's
    accepted: bool
    reason: str
    seconds: float

    @property
    def answer(self) -> Answer | None:
        return self.rechecked.answer

    def trace(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "span": self.span,
            "answer": self.answer.value if self.answer else None,
            "answer_source": self.rechecked.answer_source,
            "accepted": self.accepted,
            "reason": self.reason,
            "seconds": round4(self.seconds),
            **({"decoded": self.rechecked.generation.decoded} if self.rechecked.generation.decoded is not None else {}),
        }


def judge_feedback(answer: Answer | None, candidates: list[Candidate]) -> tuple[bool, str]:
    """The spec's rule: a feedback answer counts only if round 1 produced it too."""
    if answer is None:
        return False, "no extractable answer: returning the best round-1 candidate"
    known = [c.answer for c in candidates if c.answer is not None]
    if answer in known:
        return True, f"answer {answer} is among the round-1 answers"
    listed = ", ".join(dict.fromkeys(a.value for a in known))
    return False, f"answer {answer} is not among the round-1 answers ({listed}): returning the best round-1 candidate"


def round4(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
