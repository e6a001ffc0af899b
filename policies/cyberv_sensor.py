"""CyberV's sensor and controller: pure functions over round 1's candidates (no engine calls).

What the engine wrote (`Generation`, with its per-token top logprobs), the signals s1..s5 read from it, the
official controller's gate, the stopping rule of the adaptive round 1 (`outlook`), and the rule that judges
a feedback answer. `policies/cyberv.py` documents the method and runs the loop; the constants below are the
official code's values unless marked otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from refine_server.policies.answers import Answer

if TYPE_CHECKING:
    from refine_server.policies.token_stats import ChoiceTokenStats

SIGNAL_WEIGHT = 0.2  # official: every beta_i is 0.2
CONFIDENCE_DROP = -0.5  # s2: relative drop of p_i against p_0 that zeroes the signal
REPEAT_LENGTH, REPEAT_TIMES = 15, 5  # s3: official substring length (15-29) and count
MARGIN_RATIO = 0.5  # s4 (refine's transfer to text): answer margin below this fraction of the direct answer's
SPAN_CHARS = 80  # feedback (refine's transfer to text): characters quoted on either side of the spike
# The most one candidate can add to its answer's score: every signal is at most 1.
MAX_CANDIDATE_SCORE = SIGNAL_WEIGHT * 5
# The forecast of the adaptive round 1 (refine's): round 1 completed this many times at random, which puts the
# standard error of a 5% risk near 1 point, at a few milliseconds of CPU per check for n = 8.
FORECASTS = 400
# How readily a sample gives an answer nobody has given yet (the urn's concentration): not fixed but inferred
# per round from how many distinct answers the samples gave, over this log-spaced grid with equal prior weight.
CONCENTRATIONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


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

    @classmethod
    def from_choice(cls, choice: dict[str, Any], stats: ChoiceTokenStats | None = None) -> Generation:
        """A vLLM chat choice with its logprobs; with `stats`, each token carries the engine's measurements."""
        items = (choice.get("logprobs") or {}).get("content") or ()
        if stats is not None and len(stats.entropy) == len(items):
            tokens = [Token.from_engine(item, stats, j) for j, item in enumerate(items)]
        else:
            tokens = [Token.from_logprobs(item) for item in items]
        return cls((choice.get("message") or {}).get("content") or "", tokens, choice.get("finish_reason"))

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

    def take_answer(self, answer: Answer, source: Literal["own_text", "final_step", "unmarked_text"]) -> None:
        """Record the answer and the tokens that wrote it (in the final step or in the candidate's text)."""
        written = self.final if source == "final_step" else self.generation
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
            entry["decoded"] = {"generation": self.generation.decoded,
                                "final_step": self.final.decoded if self.final else None}
        if self.answer is None:
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
    windows = Counter(text[i:i + REPEAT_LENGTH] for i in range(len(text) - REPEAT_LENGTH + 1))
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
        return Decision("no_answer", candidates[0], [], threshold,
                        "no candidate has an extractable answer: returning the direct answer")
    top = tallies[0]
    best = max(top.candidates, key=lambda c: c.score)
    if top.score > threshold:
        return Decision("accepted", best, tallies, threshold,
                        f"answer {top.answer} scored {top.score:.3f} > n*theta = {threshold:.3f}")
    return Decision("feedback", best, tallies, threshold,
                    f"best answer {top.answer} scored {top.score:.3f} <= n*theta = {threshold:.3f}")


@dataclass(frozen=True)
class Outlook:
    """Whether round 1 can stop, and what the gate over all n candidates decides: for certain (`certain`), or
    in at least 1 - stop_risk of the forecast completions of round 1."""

    settled: Literal["accepted", "feedback"] | None
    reason: str
    answer: Answer | None = None  # the answer accepted
    certain: bool = True


def outlook(candidates: list[Candidate], n: int, threshold: float, stop_risk: float = 0.0) -> Outlook:
    """The adaptive round 1's stopping rule (refine's addition; the official code always draws all n).

    After `sense(candidates, n)` each drawn candidate's score is a lower bound: only s5 can still grow, by at
    most remaining / n (its rank rises by one per later candidate at most). A candidate still to come adds at
    most MAX_CANDIDATE_SCORE to one answer. So with r candidates remaining:
    - the best answer is fixed and accepted once its score exceeds n * theta and every other answer's upper
      bound, including an answer no candidate has given yet (r * MAX_CANDIDATE_SCORE);
    - the feedback round is certain once some answer exists and no answer can exceed n * theta any more.
    Either way the gate decides as it would with all n candidates drawn. With `stop_risk` > 0, round 1 also
    stops where the decision is not certain but likely (`forecast`).
    """
    remaining = n - len(candidates)
    tallies = tally(candidates)
    if remaining <= 0 or not tallies:
        return Outlook(None, "")
    fresh = remaining * MAX_CANDIDATE_SCORE

    def upper(t: Tally) -> float:
        return t.score + len(t.candidates) * SIGNAL_WEIGHT * remaining / n + fresh

    drawn = f"after {len(candidates)} of {n} candidates"
    top = tallies[0]
    rivals = max([fresh, *(upper(t) for t in tallies[1:])])
    if top.score > threshold and top.score > rivals:
        return Outlook("accepted", f"{drawn}, answer {top.answer} has {top.score:.3f} > n*theta = {threshold:.3f} "
                                   f"and no other answer can reach it (at most {rivals:.3f})", top.answer)
    reachable = max([fresh, *(upper(t) for t in tallies)])
    if reachable <= threshold:
        return Outlook("feedback", f"{drawn}, no answer can exceed n*theta = {threshold:.3f} "
                                   f"(at most {reachable:.3f}): the feedback round runs")
    return forecast(candidates, n, threshold, stop_risk) if stop_risk > 0 else Outlook(None, "")


def forecast(candidates: list[Candidate], n: int, threshold: float, stop_risk: float) -> Outlook:
    """The stopping rule with slack: stop when one decision of the gate over all n, an answer accepted or the
    feedback round, comes out of at least 1 - `stop_risk` of FORECASTS random completions of round 1.

    A completion draws the remaining candidates from a Polya urn over the reasoning candidates seen so far (the
    direct answer is greedy, so it says nothing of what a sample will say): each new candidate repeats the
    answer and signals of a random earlier one (drawn or forecast), or, with the urn's concentration as weight,
    gives an answer nobody has given, with a random earlier one's signals. The concentration is drawn per
    completion from its posterior given the number of distinct answers so far (Ewens' sampling formula), so
    samples that keep disagreeing forecast more disagreement, and agreeing ones more agreement. Every
    completion is scored as the sensor scores a full round (s5 ranked over all n) and decided by the gate. An
    answer can be accepted only if a drawn candidate gave it (its text is what is returned). The random stream
    is seeded from the draw alone, so the same candidates always stop alike.
    """
    pool = [c for c in candidates if c.kind == "reasoning"]
    # One sample says nothing of how samples spread (the concentration's likelihood is flat): the forecast
    # would be the prior's alone.
    if len(pool) < 2 or all(c.answer is None for c in candidates):
        return Outlook(None, "")
    remaining = n - len(candidates)
    rng = random.Random(len(candidates))
    weights = _concentration_posterior(len(pool), len({c.answer for c in pool}))
    seen: list[tuple[Any, float, float]] = [(c.answer, c.signals["s1"], _base(c)) for c in candidates]
    urn = [(c.answer, c.signals["s1"], _base(c)) for c in pool]
    outcomes: Counter[tuple[str, Any]] = Counter()
    for trial in range(FORECASTS):
        concentration = rng.choices(CONCENTRATIONS, weights)[0]
        draws = list(urn)
        completed = list(seen)
        for k in range(remaining):
            answer, p, base = rng.choice(draws)
            if rng.random() * (len(draws) + concentration) >= len(draws):
                answer = ("new", trial, k)  # nobody's answer: it votes alone
            draws.append((answer, p, base))
            completed.append((answer, p, base))
        outcomes[_gate(completed, n, threshold)] += 1
    (action, answer), count = outcomes.most_common(1)[0]
    share = count / FORECASTS
    if share < 1 - stop_risk or action == "no_answer":
        return Outlook(None, "")
    if action == "accepted" and not isinstance(answer, Answer):  # an answer nobody has given: no text to return
        return Outlook(None, "")
    drawn = f"after {len(candidates)} of {n} candidates"
    held = f"in {share:.0%} of {FORECASTS} forecast completions of the other {remaining} (stop_risk {stop_risk})"
    if action == "accepted":
        now = next(t.score for t in tally(candidates) if t.answer == answer)
        return Outlook("accepted", f"{drawn}, answer {answer} has {now:.3f}; with all {n} it exceeds n*theta = "
                                   f"{threshold:.3f} as the best answer {held}", answer, certain=False)
    return Outlook("feedback", f"{drawn}, no answer exceeds n*theta = {threshold:.3f} {held}: the feedback round "
                               f"runs", certain=False)


def _concentration_posterior(samples: int, distinct: int) -> list[float]:
    """Weights of CONCENTRATIONS given `distinct` answers among `samples` draws of the urn: Ewens' likelihood
    theta^k * Gamma(theta) / Gamma(theta + m), under an equal prior weight per grid point."""
    logs = [distinct * math.log(t) + math.lgamma(t) - math.lgamma(t + samples) for t in CONCENTRATIONS]
    top = max(logs)
    return [math.exp(v - top) for v in logs]


def _base(candidate: Candidate) -> float:
    """s1 + s2 + s3 + s4: the signals that later candidates do not change."""
    return sum(v for name, v in candidate.signals.items() if name != "s5")


def _gate(round1: list[tuple[Any, float, float]], n: int, threshold: float) -> tuple[str, Any]:
    """The gate over a completed round 1 of (answer, p, s1..s4 sum): ranks over all n, sums per answer."""
    ranks = rank_ascending([p for _, p, _ in round1])
    scores: dict[Any, float] = {}
    for (answer, _, base), rank in zip(round1, ranks):
        if answer is not None:
            scores[answer] = scores.get(answer, 0.0) + SIGNAL_WEIGHT * (base + rank / n)
    if not scores:
        return ("no_answer", None)
    best = max(scores, key=lambda a: scores[a])  # the first seen wins a tie, as in `tally`
    return ("accepted", best) if scores[best] > threshold else ("feedback", None)


def settle(candidates: list[Candidate], threshold: float, stop: Outlook | None) -> Decision:
    """Round 1's decision: the gate's (`decide`) over the drawn candidates, or, where round 1 stopped early,
    the gate's decision over all n as `outlook` found it. The two differ only where a forecast accepts an
    answer that the drawn scores have not accepted (yet): then that answer's best candidate is chosen."""
    decision = decide(candidates, threshold)
    if stop is None or stop.settled == "feedback":
        return decision
    if decision.action == "accepted" and decision.tallies[0].answer == stop.answer:
        return decision
    chosen = next(t for t in decision.tallies if t.answer == stop.answer)
    return dataclasses.replace(decision, action="accepted", best=max(chosen.candidates, key=lambda c: c.score),
                               reason=stop.reason)


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
