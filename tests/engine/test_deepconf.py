"""The deepconf policy, and cyberv's confidence options, on the real model through the official openai client.
tests/unit/policies/test_deepconf.py has the loop against a scripted engine; tests/engine/test_confidence_stop.py
holds the engine's stop to a recomputation."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest
from openai import OpenAI

from refine_server.policies.answer_extraction import extract_answer
from tests.conftest import ENGINE_ENV, MODEL, metric_total, start_refine, stop_refine
from tests.fake_vllm import free_port

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]
# Short traces and a short window: the bundled model answers in tens of tokens.
SMALL = {"policy": "deepconf", "warmup": 3, "max_traces": 5, "batch_size": 2, "max_trace_tokens": 48, "window": 8}


def _trace(resp: object) -> dict:
    return resp.model_extra["refine"]["trace"]  # type: ignore[attr-defined]


def test_engine_deepconf_answers_and_its_vote_weights_follow_the_traces_confidences(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, seed=0, extra_body={"refine": {**SMALL, "tau": None}}
    )
    trace = _trace(resp)
    summary = trace["summary"]
    assert summary["sensor_source"] == "engine" and summary["traces_drawn"] == len(trace["traces"]) == 5
    assert summary["warmup"] == 3 and summary["threshold_source"] == "warmup (high)"
    s = summary["threshold"]
    for t in trace["traces"]:
        assert t["tokens"] > 0 and t["min_group_confidence"] is not None, t
        if t["votes"]:
            # A voter weighs its own lowest group confidence, and has at least the threshold.
            assert t["weight"] == t["min_group_confidence"] >= s and t["answer"] is not None, t
        else:
            assert t["weight"] == 0.0 and (
                t["answer"] is None or t["min_group_confidence"] < s or summary["vote_fallback"]
            )
        assert t["stopped_low_confidence"] == (t["stopped_at"] is not None)
        assert t["phase"] == ("warmup" if t["index"] < 3 else "final")
        assert not (t["phase"] == "warmup" and t["stopped_low_confidence"])  # the warmup runs in full
    # The answer is the one with the largest summed weight, and the returned text is its most confident voter's.
    sums: dict[str, float] = defaultdict(float)
    for t in trace["traces"]:
        sums[t["answer"]] += t["weight"]
    if trace["chosen"]["answer"] is not None:
        assert max(sums, key=lambda a: sums[a]) == trace["chosen"]["answer"]
        found = extract_answer(resp.choices[0].message.content or "")
        assert found is not None and found.value == trace["chosen"]["answer"]
    assert resp.usage.completion_tokens >= sum(t["tokens"] for t in trace["traces"])


def test_engine_a_threshold_above_every_confidence_stops_every_trace_right_after_stop_after(client: OpenAI) -> None:
    refine = {**SMALL, "threshold": 1e6, "max_traces": 2, "stop_after": 5}
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, seed=0, extra_body={"refine": refine})
    trace = _trace(resp)
    assert trace["summary"]["threshold_source"] == "given" and trace["summary"]["stopped_early"] == 2
    # Five tokens, then the end-of-sequence the stop forced.
    assert [(t["stopped_at"], t["tokens"]) for t in trace["traces"]] == [(5, 6), (5, 6)], trace["traces"]
    assert trace["summary"]["tokens_saved_estimate"]["total"] > 0


def test_engine_deepconf_metrics_count_traces_and_stops(refine_server, client: OpenAI) -> None:
    import httpx

    before = metric_total(httpx.get(f"{refine_server.url}/metrics").text, "refine_stopped_traces_per_request_sum")
    refine = {**SMALL, "threshold": 1e6, "max_traces": 2, "stop_after": 5}
    client.chat.completions.create(model=MODEL, messages=QUESTION, seed=1, extra_body={"refine": refine})
    after = metric_total(httpx.get(f"{refine_server.url}/metrics").text, "refine_stopped_traces_per_request_sum")
    assert after - before == 2


@pytest.mark.parametrize(
    "refine, param",
    [
        ({"window": 0}, "refine.window"),
        ({"confidence_k": 21}, "refine.confidence_k"),
        ({"max_traces": 65}, "refine.max_traces"),
        ({"tau": 2}, "refine.tau"),
    ],
)
def test_engine_bad_parameters_are_400s_naming_the_field(client: OpenAI, refine: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=8, extra_body={"refine": {"policy": "deepconf", **refine}}
        )
    assert err.value.body["param"] == param, err.value.body  # type: ignore[index]


def test_engine_without_the_plugin_the_proxy_reads_top_logprobs_and_aborts_the_stream(engine_url: str) -> None:
    """The real engine behind a refine that does not share its secret: to this proxy the upstream has no plugin,
    so every trace is streamed with top_logprobs and stopped by the proxy."""
    server = start_refine(
        "deepconf-no-plugin",
        free_port(),
        "--backend-url",
        engine_url,
        "--workers",
        "1",
        ready_timeout_s=60,
        env={**ENGINE_ENV, "REFINE_ENGINE_SECRET": "another-secret-" + "1" * 49},
    )
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        refine = {**SMALL, "max_traces": 4, "tau": None}
        trace = _trace(
            client.chat.completions.create(model=MODEL, messages=QUESTION, seed=0, extra_body={"refine": refine})
        )
        assert trace["summary"]["sensor_source"] == "top_logprobs" and trace["summary"]["traces_drawn"] == 4
        assert all(t["min_group_confidence"] is not None for t in trace["traces"])
        stopped = _trace(
            client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                seed=0,
                extra_body={"refine": {**refine, "threshold": 1e6, "max_traces": 2, "stop_after": 5}},
            )
        )
        # The proxy left each stream once its fifth token's window fell below the threshold.
        assert [(t["stopped_at"], t["tokens"]) for t in stopped["traces"]] == [(5, 5), (5, 5)], stopped["traces"]
    finally:
        stop_refine(server)


def test_engine_cyberv_with_confidence_stop_and_vote_answers(client: OpenAI) -> None:
    refine = {
        "policy": "cyberv",
        "n": 5,
        "max_reasoning_tokens": 48,
        "max_feedback_tokens": 48,
        "confidence_stop": True,
        "vote": "confidence",
        "confidence_window": 8,
    }
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, seed=0, extra_body={"refine": refine})
    trace = _trace(resp)
    confidence = trace["confidence"]
    assert confidence["stop"] is True and confidence["vote"] == "confidence" and confidence["warmup"] == [1, 2]
    assert confidence["threshold"] is not None and trace["round1"]["drawn"] == 5
    scores = [c["score"] for c in trace["candidates"]]
    assert max(scores) == 1.0 and all(0 <= s <= 1 for s in scores)
    for c in trace["candidates"]:
        if c["confidence"]["stopped_low_confidence"]:
            assert c["answer"] is None and c["score"] == 0.0
    assert resp.choices[0].message.content
