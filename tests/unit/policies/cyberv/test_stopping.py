"""policies.cyberv.stopping: when the adaptive round 1 may stop, on hand-made candidates."""

from __future__ import annotations

import pytest

from refine_server.policies.answer_extraction import Answer
from refine_server.policies.cyberv.sensor import decide, sense
from refine_server.policies.cyberv.stopping import outlook, settle
from tests.unit.policies.cyberv.test_sensor import _candidate


@pytest.mark.parametrize(
    "answers, settled",
    [
        ([4, 4, 4, 4, 4], "accepted"),  # 5 of 8 agree: 3 more cannot outvote them
        ([4, 4, 4, 4], None),  # 4 of 8 agree: 4 more agreeing on something else could win
        ([4, 4, 4, 5, 5], None),
    ],
)
def test_outlook_accepts_only_when_no_remaining_candidates_could_change_the_answer(answers, settled) -> None:
    candidates = [_candidate(i, "x", f" {k}.", 0.95) for i, k in enumerate(answers)]
    sense(candidates, 8)
    assert outlook(candidates, 8, 8 * 0.3).settled == settled


def test_outlook_goes_straight_to_feedback_when_no_answer_can_pass_the_gate() -> None:
    # Seven candidates, seven answers (each below 1): the last one (at most 1) cannot lift any above 2.4.
    candidates = [_candidate(i, "x", f" {k}.", 0.05) for i, k in enumerate(range(7))]
    sense(candidates, 8)
    result = outlook(candidates, 8, 8 * 0.3)
    assert result.settled == "feedback" and "no answer can exceed n*theta" in result.reason
    sense(candidates[:5], 8)
    assert outlook(candidates[:5], 8, 8 * 0.3).settled is None  # three more could still lift one of them


def test_outlook_is_unsettled_without_any_answer_or_with_nothing_left_to_draw() -> None:
    silent = [_candidate(i, "x", " unclear", 0.9) for i in range(6)]
    sense(silent, 8)
    assert outlook(silent, 8, 2.4).settled is None  # a later answer would decide between feedback and none
    full = [_candidate(i, "x", " 4.", 0.95) for i in range(8)]
    sense(full, 8)
    assert outlook(full, 8, 2.4).settled is None  # round 1 is over: decide() takes it from here


def test_outlook_agrees_with_the_full_round_on_random_rounds() -> None:
    """Whenever the rule stops early, the gate over all n decides the same action and answer."""
    import random

    rng = random.Random(0)
    stopped = 0
    for _ in range(400):
        n = rng.choice([4, 6, 8])
        answers = [rng.choice([1, 1, 1, 2, 3]) for _ in range(n)]
        probs = [rng.choice([0.05, 0.3, 0.6, 0.95]) for _ in range(n)]
        full = [_candidate(i, "x", f" {a}.", p) for i, (a, p) in enumerate(zip(answers, probs))]
        sense(full, n)
        final = decide(full, n * 0.3)
        for m in range(2, n):
            drawn = full[:m]
            sense(drawn, n)
            early = outlook(drawn, n, n * 0.3)
            if early.settled:
                stopped += 1
                assert early.settled == final.action
                if final.action == "accepted":
                    assert decide(drawn, n * 0.3).tallies[0].answer == final.tallies[0].answer
                break
    assert stopped > 50


def test_forecast_accepts_a_unanimous_start_that_the_certain_rule_must_wait_on() -> None:
    candidates = [_candidate(i, "x", " 4.", 0.95) for i in range(4)]
    sense(candidates, 8)
    assert outlook(candidates, 8, 2.4).settled is None  # four more could still agree on another answer
    likely = outlook(candidates, 8, 2.4, stop_risk=0.05)
    assert likely.settled == "accepted" and not likely.certain and likely.share >= 0.95
    assert likely.reason.startswith("after 4 of 8 candidates, answer 4 has") and "forecast completions" in likely.reason
    assert f"in {likely.share:.0%} of 400 forecast completions" in likely.reason
    assert outlook(candidates, 8, 2.4, stop_risk=0.05) == likely  # seeded by the draw: the same stop every time


def test_forecast_sends_scattered_answers_to_feedback_early() -> None:
    candidates = [_candidate(i, "x", f" {k}.", 0.3) for i, k in enumerate([1, 2, 3, 4, 5, 6])]
    sense(candidates, 8)
    assert outlook(candidates, 8, 2.4).settled is None  # two more agreeing with one could still pass the gate
    # Five samples, five answers: the urn is wide, and in 92% of the completions the last two do not both
    # repeat one of them.
    assert outlook(candidates, 8, 2.4, stop_risk=0.05).settled is None
    likely = outlook(candidates, 8, 2.4, stop_risk=0.1)
    assert likely.settled == "feedback" and "no answer exceeds n*theta = 2.400 in 92% of 400" in likely.reason


def test_a_forecast_may_accept_an_answer_the_drawn_scores_have_not_passed_yet() -> None:
    # Three agreeing, confident candidates of ten: their sum (2.49) is below the gate (3.0), and with all ten
    # it passes in most completions.
    candidates = [_candidate(i, "x", " 4.", 0.95) for i in range(3)]
    sense(candidates, 10)
    assert decide(candidates, 3.0).action == "feedback"
    likely = outlook(candidates, 10, 3.0, stop_risk=0.1)
    assert likely.settled == "accepted" and likely.answer == Answer("number", "4") and not likely.certain
    assert likely.reason.startswith("after 3 of 10 candidates, answer 4 has 2.490; with all 10 it exceeds")
    decision = settle(candidates, 3.0, likely)
    assert decision.action == "accepted" and decision.best is candidates[2] and decision.reason == likely.reason
    assert 0.9 <= likely.share < 0.95
    assert outlook(candidates, 10, 3.0, stop_risk=0.05).settled is None  # 92% of the completions: not enough
    assert settle(candidates, 3.0, None) == decide(candidates, 3.0)


def test_no_forecast_from_a_single_sample() -> None:
    candidates = [_candidate(0, "x", " 4.", 0.95), _candidate(1, "x", " 4.", 0.95)]
    sense(candidates, 8)
    assert outlook(candidates, 8, 2.4, stop_risk=0.5).settled is None


def test_forecast_decides_as_the_full_round_on_nearly_all_random_rounds_and_stops_sooner() -> None:
    """Rounds drawn from a fixed answer distribution: the forecast may disagree with all n (that is its slack)
    but rarely, and it must stop earlier than the certain rule on average."""
    import random

    rng = random.Random(1)
    agree, drawn_certain, drawn_likely, rounds = 0, 0, 0, 300
    for _ in range(rounds):
        weights = rng.choice([[6, 1, 1], [3, 2, 2], [1, 1, 1, 1, 1]])
        answers = rng.choices(range(len(weights)), weights, k=8)
        probs = [rng.uniform(0.2, 1.0) for _ in range(8)]
        full = [_candidate(i, "x", f" {a}.", p) for i, (a, p) in enumerate(zip(answers, probs))]
        sense(full, 8)
        final = decide(full, 2.4)
        for risk in (0.0, 0.05):
            for m in (3, 5, 7, 8):
                drawn = full[:m]
                sense(drawn, 8)
                if m == 8 or outlook(drawn, 8, 2.4, risk).settled:
                    break
            early = settle(drawn, 2.4, outlook(drawn, 8, 2.4, risk) if m < 8 else None)
            if risk == 0.0:
                drawn_certain += m
            else:
                drawn_likely += m
                agree += early.action == final.action and (
                    final.action != "accepted" or early.tallies[0].answer == final.tallies[0].answer
                )
    assert agree / rounds >= 0.9
    assert drawn_likely < 0.9 * drawn_certain
