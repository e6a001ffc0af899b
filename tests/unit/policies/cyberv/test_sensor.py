"""policies.cyberv.sensor: the sensor and the controller on hand-made candidates."""

from __future__ import annotations

import pytest

from refine_server.policies.answer_extraction import Answer, parse_answer
from refine_server.policies.cyberv.sensor import (
    Candidate,
    confidence_signal,
    decide,
    has_repetition,
    judge_feedback,
    quote_span,
    rank_ascending,
    sense,
)
from tests.unit.policies.cyberv.responses import DIRECT, SPIKE_WORD, _gen


def _candidate(index: int, text: str, final: str, p: float) -> Candidate:
    """A candidate whose answer its final-answer step stated (`final`, first token with probability p)."""
    candidate = Candidate(index, "direct" if index == 0 else "reasoning", _gen(text), _gen(final, p))
    stated = parse_answer(candidate.final.text)
    if stated is not None:
        candidate.take_answer(stated, "final_step")
    return candidate


def test_unanimous_confident_candidates_are_accepted() -> None:
    candidates = [_candidate(i, f"Step {i}. The answer is 4.", " 4.", 0.95) for i in range(8)]
    sense(candidates, 8)
    assert candidates[3].signals == pytest.approx({"s1": 0.95, "s2": 1, "s3": 1, "s4": 1, "s5": 4 / 8})
    assert candidates[3].score == pytest.approx(0.2 * (0.95 + 3 + 0.5))
    decision = decide(candidates, 8 * 0.3)
    assert decision.action == "accepted"
    assert [t.answer for t in decision.tallies] == [Answer("number", "4")]
    assert decision.best is candidates[7]  # ties in p are ranked in candidate order, so the last ranks highest


def test_split_answers_trigger_feedback() -> None:
    candidates = [_candidate(i, f"The answer is {i % 4}.", f" {i % 4}.", 0.4) for i in range(8)]
    sense(candidates, len(candidates))
    decision = decide(candidates, 8 * 0.3)
    assert decision.action == "feedback"
    assert len(decision.tallies) == 4 and all(t.score <= 2.4 for t in decision.tallies)
    assert "<= n*theta = 2.400" in decision.reason


def test_candidates_without_an_answer_do_not_vote() -> None:
    candidates = [
        _candidate(0, "The answer is 4.", " 4.", 0.9),
        _candidate(1, "I cannot tell.", " something I really cannot put into a few short words here", 0.9),
    ]
    sense(candidates, len(candidates))
    assert candidates[1].answer is None and candidates[1].trace()["reason"] == "no extractable answer"
    assert [c.index for c in decide(candidates, 0.0).tallies[0].candidates] == [0]


def test_no_answer_anywhere_returns_the_direct_answer() -> None:
    candidates = [
        _candidate(i, "Hmm.", " unclear, as the question does not say what it is asking", 0.9) for i in range(3)
    ]
    sense(candidates, len(candidates))
    decision = decide(candidates, 0.0)
    assert decision.action == "no_answer" and decision.best is candidates[0]


def test_scores_of_a_partial_round_are_lower_bounds_of_the_full_rounds() -> None:
    """s5 over the planned n: a candidate's rank among those drawn is the least its rank among all n can be."""
    full = [_candidate(i, "x", f" {k}.", p) for i, (k, p) in enumerate([(4, 0.9), (4, 0.5), (5, 0.7), (4, 0.95)])]
    sense(full, 4)
    partial = [_candidate(i, "x", f" {k}.", p) for i, (k, p) in enumerate([(4, 0.9), (4, 0.5)])]
    sense(partial, 4)
    assert [c.signals["s5"] for c in partial] == [2 / 4, 1 / 4]
    assert all(p.score <= f.score for p, f in zip(partial, full))


def test_confidence_drop_signal() -> None:
    assert confidence_signal(0.4, 0.9) == 0.0  # (0.4 - 0.9) / 0.9 = -0.56
    assert confidence_signal(0.5, 0.9) == 1.0  # -0.44
    assert confidence_signal(0.1, 0.0) == 1.0  # no reference


def test_rank_signal_gives_the_most_probable_answer_rank_n() -> None:
    assert rank_ascending([0.5, 0.9, 0.5, 0.1]) == [2, 4, 3, 1]


def test_uncertainty_signal_compares_answer_margins_with_the_direct_answer() -> None:
    candidates = [
        _candidate(0, "The answer is 4.", " 4.", 0.9),
        _candidate(1, "The answer is 4.", " 4.", 0.45),
        _candidate(2, "The answer is 4.", " 4.", 0.8),
    ]
    sense(candidates, len(candidates))
    # margins: 0.9 - 0.08 = 0.82 for the direct answer; 0.45 - 0.44 = 0.01 and 0.8 - 0.16 = 0.64
    assert [c.signals["s4"] for c in candidates] == [1.0, 0.0, 1.0]


def test_repetition_signal() -> None:
    assert has_repetition("We add one more. " * 6)
    assert not has_repetition("We add one more. " * 4)
    assert not has_repetition("short " * 3)
    assert not has_repetition("=" * 40)  # counted without overlaps, a rule of 40 is one repeat of 15, not five
    assert not has_repetition("Two plus two is four, and four is the answer to what was asked here.")


def test_feedback_quotes_the_text_around_the_uncertainty_spike() -> None:
    text = "x" * 200 + f" {SPIKE_WORD} " + "y" * 200
    candidate = _candidate(1, text, " 4.", 0.9)
    sense([_candidate(0, DIRECT, " 4.", 0.9), candidate], 2)
    assert candidate.spike.token == f" {SPIKE_WORD}"
    span = quote_span(candidate)
    assert span.startswith("...") and span.endswith("...") and SPIKE_WORD in span
    assert len(span) <= 2 * 80 + 6


def test_feedback_answer_must_be_among_round1_answers() -> None:
    candidates = [_candidate(i, f"The answer is {k}.", f" {k}.", 0.5) for i, k in enumerate((3, 5))]
    assert judge_feedback(Answer("number", "5"), candidates)[0]
    accepted, reason = judge_feedback(Answer("number", "9"), candidates)
    assert not accepted and "not among the round-1 answers (3, 5)" in reason
    assert judge_feedback(None, candidates) == (False, "no extractable answer: returning the best round-1 candidate")
