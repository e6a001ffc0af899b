"""cyberv's DeepConf options against a scripted engine with the sensor: `confidence_stop` (round 1's first batch
is the warmup, later samples stop in the engine) and `vote: confidence` (the gate sums confidence weights)."""

from __future__ import annotations

from typing import Any

import pytest

from refine_server.contract.params import TokenStatsParams
from refine_server.policies.base import STOPPED_TRACES, TOKENS_SAVED, PolicyRequestError
from refine_server.policies.confidence import threshold_from_warmup
from refine_server.policies.cyberv.policy import CyberVParams, CyberVPolicy
from refine_server.policies.token_stats import ChoiceTokenStats
from tests.unit.policies.cyberv.test_policy import DIRECT, ScriptedBackend, _call

CUT = 3  # tokens a stopped sample keeps


def _with_engine_sensor(call: Any, level: dict[str, float]) -> list[TokenStatsParams | None]:
    """The call's engine as one with refine's plugin: each choice's token confidence is `level` of the first
    key its text contains (else 10); with the sensor's stop, a choice below the threshold is cut after CUT
    tokens, as the engine cuts it. Returns the sensor requests, in call order."""
    engine, asked = call.engine, []

    async def available() -> None:
        return None

    async def chat_with_token_stats(
        purpose: str, messages: list[dict[str, Any]], *, sensor: TokenStatsParams | None = None, **fields: Any
    ) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
        asked.append(sensor)
        result = await engine.chat(purpose, messages, **fields)
        stats = {}
        for choice in result["choices"]:
            text = choice["message"]["content"]
            c = next((v for k, v in level.items() if k in text), 10.0)
            content = choice["logprobs"]["content"]
            stopped_at = None
            if sensor is not None and sensor.stop is not None and c < sensor.stop.threshold:
                content[:] = content[:CUT]
                choice["message"]["content"] = "".join(t["token"] for t in content)
                stopped_at = CUT - 1
            n = len(content)
            stats[choice["index"]] = ChoiceTokenStats(
                [0] * n, [0.5] * n, [0.0] * n, [0.5] * n, [0.9] * n, [c] * n, 0, stopped_at=stopped_at
            )
        return result, stats

    engine.token_stats_unavailable = available
    engine.chat_with_token_stats = chat_with_token_stats
    return asked


def _backend() -> ScriptedBackend:
    reasoning = [
        "Two and two make four, surely. The answer is 4.",  # warmup
        "Two and two make four, clearly. The answer is 4.",  # warmup
        "Hmm shaky guess here. The answer is 5.",
        "Two and two make four, again. The answer is 4.",
        "Hmm shaky again here. The answer is 6.",
        "Two and two make four, fine. The answer is 4.",
        "Hmm shaky once more. The answer is 7.",
    ]
    return ScriptedBackend(DIRECT, reasoning, dict.fromkeys([DIRECT, *reasoning], (" 4.", 0.9)))


async def test_confidence_stop_takes_the_first_batch_as_warmup_and_stops_later_samples_in_the_engine() -> None:
    backend = _backend()
    call = _call(backend)
    levels = {"surely": 8.0, "clearly": 12.0, "shaky": 2.0}
    asked = _with_engine_sensor(call, levels)
    await CyberVPolicy().complete(call, CyberVParams(adaptive=False, confidence_stop=True))

    trace = call.trace.data
    s = threshold_from_warmup([8.0, 12.0], "high")
    # The direct answer and the warmup batch ran without the stop; every later batch with it, at s.
    assert asked[:2] == [None, None]
    assert all(a is not None and a.stop is not None and a.stop.threshold == pytest.approx(s) for a in asked[2:])
    assert all(a.stop.window == 64 for a in asked[2:] if a is not None and a.stop is not None)
    assert trace["round1"]["drawn"] == 8 and backend.kinds().count("reasoning") == 4  # 2 + 2 + 2 + 1: in batches
    shaky = [c for c in trace["candidates"] if c["confidence"]["stopped_low_confidence"]]
    assert [c["index"] for c in shaky] == [3, 5, 7]
    assert all(c["answer"] is None and c["reason"].startswith("stopped for low confidence") for c in shaky)
    assert "final" not in backend.kinds()  # no final-answer step for a sample cut short
    summary = trace["confidence"]
    assert summary["threshold"] == pytest.approx(s, abs=1e-4) and summary["warmup"] == [1, 2]
    assert summary["stopped"] == 3 and summary["tokens_saved_estimate"] > 0
    assert call.trace.values[STOPPED_TRACES.name] == 3
    assert call.trace.values[TOKENS_SAVED.name] == summary["tokens_saved_estimate"]
    assert trace["chosen"]["answer"] == "4"


async def test_vote_confidence_replaces_the_scores_with_relative_lowest_group_confidences() -> None:
    call = _call(_backend())
    _with_engine_sensor(call, {"surely": 5.0, "clearly": 10.0, "shaky": 2.5})
    await CyberVPolicy().complete(call, CyberVParams(adaptive=False, vote="confidence"))
    candidates = call.trace.data["candidates"]
    # Relative to the most confident candidate (10): the direct answer and unmarked texts sit at the default 10.
    weights = {c["index"]: c["score"] for c in candidates}
    assert weights[2] == 1.0 and weights[1] == 0.5 and weights[3] == 0.25
    assert all(c["score"] == c["confidence"]["min_group_confidence"] / 10 for c in candidates)
    answers = {a["answer"]: a["score"] for a in call.trace.data["answers"]}
    assert answers["4"] == pytest.approx(sum(weights[i] for i in (0, 1, 2, 4, 6)))
    assert call.trace.data["confidence"]["stop"] is False and STOPPED_TRACES.name not in call.trace.values


@pytest.mark.parametrize(
    "params, param",
    [
        ({"confidence_stop": True}, "refine.confidence_stop"),
        ({"vote": "confidence"}, "refine.vote"),
        ({"vote": "confidence", "sensor": "top_logprobs"}, "refine.sensor"),
        ({"confidence_stop": True, "decode": {"policy": "srgen"}}, "refine.decode"),
    ],
)
async def test_confidence_options_need_the_engines_confidence(params: dict[str, Any], param: str) -> None:
    backend = _backend()
    with pytest.raises(PolicyRequestError) as err:
        await CyberVPolicy().complete(_call(backend), CyberVParams(**params))
    assert err.value.param == param and backend.calls == []
