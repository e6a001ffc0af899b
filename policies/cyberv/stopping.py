"""When CyberV's adaptive round 1 may stop drawing candidates (refine's addition: the official code always
draws all n). Pure functions over the candidates drawn so far, scored by `sensor.sense`.

- `outlook`: stop when the gate's decision over all n is certain whatever the remaining candidates say, or,
  with `stop_risk` > 0, when `forecast`'s random completions of round 1 agree on it often enough;
- `settle`: the decision round 1 ends with, which is the forecast's where it stopped on one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from refine_server.policies.answer_extraction import Answer
from refine_server.policies.cyberv.sensor import (
    SIGNAL_WEIGHT,
    Candidate,
    Decision,
    Tally,
    decide,
    rank_ascending,
    tally,
)

# The most one candidate can add to its answer's score: every signal is at most 1.
MAX_CANDIDATE_SCORE = SIGNAL_WEIGHT * 5
# The forecast of the adaptive round 1 (refine's): round 1 completed this many times at random, which puts the
# standard error of a 5% risk near 1 point, at a few milliseconds of CPU per check for n = 8.
FORECASTS = 400
# How readily a sample gives an answer nobody has given yet (the urn's concentration): not fixed but inferred
# per round from how many distinct answers the samples gave, over this log-spaced grid with equal prior weight.
# The grid ends at 10: an empirical-Bayes fit to the quality suite's dev rounds over a grid up to 100
# (`python bench/stopping.py`) puts 1% on 30 and 100, and keeping them at equal weight made the forecast send
# scattered starts to the feedback round too readily (at n = 16, a quarter of those stops decided otherwise
# than all 16).
CONCENTRATIONS = (0.1, 0.3, 1.0, 3.0, 10.0)

# A candidate's answer in a forecast completion of round 1: a drawn candidate's (None: no answer), or
# ("new", trial, k), an answer nobody has given.
Vote = Answer | tuple[str, int, int] | None


@dataclass(frozen=True)
class Outlook:
    """Whether round 1 can stop, and what the gate over all n candidates decides: for certain (`certain`), or
    in at least 1 - stop_risk of the forecast completions of round 1."""

    settled: Literal["accepted", "feedback"] | None
    reason: str
    answer: Answer | None = None  # the answer accepted
    certain: bool = True
    share: float = 1.0  # of the forecast completions that decide so (1.0 when certain)


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
        return Outlook(
            "accepted",
            f"{drawn}, answer {top.answer} has {top.score:.3f} > n*theta = {threshold:.3f} "
            f"and no other answer can reach it (at most {rivals:.3f})",
            top.answer,
        )
    reachable = max([fresh, *(upper(t) for t in tallies)])
    if reachable <= threshold:
        return Outlook(
            "feedback",
            f"{drawn}, no answer can exceed n*theta = {threshold:.3f} "
            f"(at most {reachable:.3f}): the feedback round runs",
        )
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
    weights = concentration_likelihood(len(pool), len({c.answer for c in pool}))
    seen: list[tuple[Vote, float, float]] = [(c.answer, c.signals["s1"], _base(c)) for c in candidates]
    urn: list[tuple[Vote, float, float]] = [(c.answer, c.signals["s1"], _base(c)) for c in pool]
    outcomes: Counter[tuple[str, Vote]] = Counter()
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
    drawn = f"after {len(candidates)} of {n} candidates"
    held = f"in {share:.0%} of {FORECASTS} forecast completions of the other {remaining} (stop_risk {stop_risk})"
    if action == "accepted":
        if not isinstance(answer, Answer):  # an answer nobody has given: no text to return
            return Outlook(None, "")
        now = next(t.score for t in tally(candidates) if t.answer == answer)
        return Outlook(
            "accepted",
            f"{drawn}, answer {answer} has {now:.3f}; with all {n} it exceeds n*theta = "
            f"{threshold:.3f} as the best answer {held}",
            answer,
            certain=False,
            share=share,
        )
    return Outlook(
        "feedback",
        f"{drawn}, no answer exceeds n*theta = {threshold:.3f} {held}: the feedback round runs",
        certain=False,
        share=share,
    )


def concentration_likelihood(samples: int, distinct: int, grid: tuple[float, ...] = CONCENTRATIONS) -> list[float]:
    """Ewens' likelihood of each concentration of `grid` given `distinct` answers among `samples` draws of the
    urn, theta^k * Gamma(theta) / Gamma(theta + m), scaled so that the largest is 1. Under the equal prior, the
    forecast's posterior weights."""
    logs = [distinct * math.log(t) + math.lgamma(t) - math.lgamma(t + samples) for t in grid]
    top = max(logs)
    return [math.exp(v - top) for v in logs]


def _base(candidate: Candidate) -> float:
    """s1 + s2 + s3 + s4: the signals that later candidates do not change."""
    return sum(v for name, v in candidate.signals.items() if name != "s5")


def _gate(round1: list[tuple[Vote, float, float]], n: int, threshold: float) -> tuple[str, Vote]:
    """The gate over a completed round 1 of (answer, p, s1..s4 sum): ranks over all n, sums per answer."""
    ranks = rank_ascending([p for _, p, _ in round1])
    scores: dict[Vote, float] = {}
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
    return dataclasses.replace(
        decision, action="accepted", best=max(chosen.candidates, key=lambda c: c.score), reason=stop.reason
    )
