"""bench/quality.py's replay of the adaptive round 1, on cyberv-full traces stored in bench/results/quality/."""

from __future__ import annotations

import json

import pytest
from quality import RESULTS, _ballots, replay_stopping


def _traces(limit: int) -> list[dict]:
    rows = (RESULTS / "test" / "cyberv-full-s0.jsonl").read_text().splitlines()[:limit]
    return [json.loads(row)["trace"] for row in rows]


def test_ballots_of_a_full_round_score_every_candidate_as_the_sensor_did() -> None:
    """The replay re-derives s5 from the traced p values: over all 8 it must give the traced scores."""
    for trace in _traces(40):
        ballots = _ballots(trace["candidates"], 8)
        assert [b.score for b in ballots] == pytest.approx([c["score"] for c in trace["candidates"]], abs=1e-3)
        assert [b.answer.value if b.answer else None for b in ballots] == [c["answer"] for c in trace["candidates"]]


def test_the_certain_rule_never_decides_otherwise_than_all_8_and_the_forecast_draws_no_more() -> None:
    for trace in _traces(40):
        certain = replay_stopping(trace, 8, 0.3, 2, stop_risk=0.0)
        likely = replay_stopping(trace, 8, 0.3, 2, stop_risk=0.05)
        assert certain["decision"][0] == certain["full"][0]
        if certain["full"][0] == "accepted":
            assert certain["decision"] == certain["full"]
        assert likely["drawn"] <= certain["drawn"]
