"""bench/stopping.py: CyberV's adaptive round 1 replayed over cyberv-full traces stored in bench/results/quality/."""

from __future__ import annotations

import json

import pytest
from quality import RESULTS
from stopping import (
    NEVER,
    WIDE_GRID,
    Round,
    Step,
    ballots,
    concentration_prior,
    decision,
    dev_rounds,
    fit_thresholds,
    forecast_round,
    pooled_rounds,
    replay,
    same_decision,
    stop_risk_rule,
    tokens,
)

from refine_server.policies.cyberv.stopping import CONCENTRATIONS, outlook


def _runs(limit: int) -> dict[int, dict[str, dict]]:
    runs = {}
    for seed in (0, 1, 2):
        path = RESULTS / "SmolLM2-135M-Instruct" / "test" / f"cyberv-full-s{seed}.jsonl"
        rows = path.read_text().splitlines()[:limit]
        runs[seed] = {row["id"]: row for row in map(json.loads, rows)}
    return runs


def _traces(limit: int) -> list[dict]:
    return [row["trace"] for row in _runs(limit)[0].values()]


def _as_the_policy_runs(trace: dict, n: int, batch: int, stop_risk: float) -> tuple[int, int, bool]:
    """(drawn, tokens, same decision as all n) of round 1 as cyberv.round1 runs it: `outlook` after the direct
    answer with the first batch, then after every batch."""
    candidates = trace["candidates"][:n]
    full = decision(ballots(candidates, n), n, 0.3)
    for m in [*range(1 + batch, n, batch), n]:
        drawn = ballots(candidates[:m], n)
        stop = outlook(drawn, n, n * 0.3, stop_risk)
        if m == n or stop.settled:
            early = decision(drawn, n, 0.3, stop if stop.settled else None)
            return m, tokens(candidates[:m]), same_decision(early, full)
    raise AssertionError("unreachable")


def test_ballots_of_a_full_round_score_every_candidate_as_the_sensor_did() -> None:
    """The replay re-derives s5 from the traced p values: over all 8 it must give the traced scores."""
    for trace in _traces(40):
        scored = ballots(trace["candidates"], 8)
        assert [b.score for b in scored] == pytest.approx([c["score"] for c in trace["candidates"]], abs=1e-3)
        assert [b.answer.value if b.answer else None for b in scored] == [c["answer"] for c in trace["candidates"]]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("stop_risk", [0.0, 0.05, 0.1])
def test_the_threshold_replay_stops_where_the_policy_would(batch: int, stop_risk: float) -> None:
    """The report replays the rule from one forecast per draw (`forecast_round`) and a threshold on its share;
    run round by round as the policy runs it, the rule must draw, spend and decide exactly alike."""
    traces = _traces(30)
    expected = [_as_the_policy_runs(trace, 8, batch, stop_risk) for trace in traces]
    replayed = replay([forecast_round(trace, 8, 0.3) for trace in traces], stop_risk_rule(8, batch, stop_risk))
    assert replayed.drawn == pytest.approx(sum(d for d, _, _ in expected) / len(traces))
    assert replayed.tokens == pytest.approx(sum(t for _, t, _ in expected) / len(traces))
    assert replayed.agreed == sum(s for _, _, s in expected)
    if stop_risk == 0:
        assert replayed.agreed == len(traces)  # the certain rule never decides otherwise than all n


def test_a_pooled_round_is_its_runs_direct_answer_then_reasoning_samples_of_every_seed_in_turn() -> None:
    runs = _runs(3)
    rounds = pooled_rounds(runs, 16)
    assert len(rounds) == 3 * 3  # each run leads once
    for lead, seed in enumerate(sorted(runs)):
        item_id, row = next(iter(runs[seed].items()))
        pooled = rounds[lead * 3]
        assert pooled["id"] == item_id and [c["index"] for c in pooled["candidates"]] == list(range(16))
        direct, *reasoning = pooled["candidates"]
        assert direct["kind"] == "direct" and direct["answer"] == row["trace"]["candidates"][0]["answer"]
        assert all(c["kind"] == "reasoning" for c in reasoning)
        order = sorted(runs)[lead:] + sorted(runs)[:lead]
        samples = [c for s in order for c in runs[s][item_id]["trace"]["candidates"][1:]]
        assert [c["completion_tokens"] for c in reasoning] == [c["completion_tokens"] for c in samples[:15]]
    with pytest.raises(ValueError, match="a round of 23 needs"):
        pooled_rounds(runs, 23)


def _round(n: int, stop_at: int, share: float, same: bool) -> Round:
    """A round of candidates of 10 tokens each whose forecast reaches `share` from `stop_at` drawn on."""
    steps = [Step(m, 10 * m, False, share if m >= stop_at else 0.0, same) for m in range(2, n)]
    return Round(n, 10 * n, steps)


def test_fitted_thresholds_stop_early_where_the_forecast_is_right_and_wait_where_it_is_not() -> None:
    """Forecasts right at draw 3 (share 0.9) and wrong at draw 5 (share 0.99): the cheapest thresholds that keep
    every decision stop the first kind at 3 and leave the second to draw all 8."""
    rounds = [_round(8, 3, 0.9, True)] * 6 + [_round(8, 5, 0.99, False)] * 2
    thresholds, fitted = fit_thresholds(rounds, target=1.0)
    assert fitted.same == 1.0 and thresholds[3] <= 0.9 and thresholds[5] > 0.99
    assert fitted.tokens == pytest.approx((6 * 30 + 2 * 80) / 8)
    # Allowed to lose a quarter of the decisions, it stops the wrong forecasts too, at draw 5.
    _, loose = fit_thresholds(rounds, target=0.75)
    assert loose.same == 0.75 and loose.tokens == pytest.approx((6 * 30 + 2 * 50) / 8)
    assert replay(rounds, dict.fromkeys(range(2, 8), NEVER)).tokens == 80  # NEVER: only the certain rule stops


def test_the_dev_rounds_support_no_concentration_beyond_the_forecasts_grid() -> None:
    """Why `CONCENTRATIONS` ends at 10: fitted over a grid up to 100, the dev rounds put almost no weight past it.
    A new dev run that moves weight there fails this until the grid is reconsidered."""
    rounds = dev_rounds()
    assert len(rounds) == 480
    fitted = dict(zip(WIDE_GRID, concentration_prior(rounds, WIDE_GRID)))
    assert sum(fitted.values()) == pytest.approx(1, abs=0.01)
    assert sum(w for c, w in fitted.items() if c > max(CONCENTRATIONS)) < 0.02


def test_the_prior_fit_finds_the_concentration_that_generated_the_rounds() -> None:
    """Rounds of 7 samples from a Chinese restaurant process at concentration 1: the fit puts most weight on 1."""
    import random

    rng = random.Random(0)
    traces = []
    for _ in range(400):
        answers: list[int] = []
        for _ in range(7):
            new = rng.random() * (len(answers) + 1.0) >= len(answers)
            answers.append(len(set(answers)) if new else rng.choice(answers))
        traces.append({"candidates": [_stored_candidate(i, a) for i, a in enumerate(answers)]})
    fitted = dict(zip(WIDE_GRID, concentration_prior(traces, WIDE_GRID)))
    assert max(fitted, key=fitted.get) == 1.0 and fitted[1.0] > 0.5


def _stored_candidate(index: int, answer: int) -> dict:
    return {
        "index": index,
        "kind": "reasoning",
        "answer": str(answer),
        "answer_kind": "number",
        "signals": {"s1": 0.9, "s2": 1.0, "s3": 1.0, "s4": 1.0, "s5": 0.5},
        "completion_tokens": 10,
    }
