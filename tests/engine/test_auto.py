"""auto on the real model through the official openai client: the decision both ways, its cost counted in the
engine's own request counter, CyberV taking the first answer, the 400s and the header. tests/unit/policies/auto/
has the signals and the policy against scripted backends.

Thresholds are constructed, not probed: DeepConf's confidence is positive and finite for any answer, so -1e9
is reached by every answer and 1e9 by none. The first two tests run with both sensors: the API's top 20
logprobs, and the engine's (which reports the token confidence from plugin protocol 2 on)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ENGINE_PORT, MODEL, metric_total

QUESTION = [{"role": "user", "content": "What is 1 + 1?"}]
NEVER, ALWAYS = -1e9, 1e9
CYBERV = {"policy": "cyberv", "n": 4, "adaptive": False, "max_reasoning_tokens": 48, "max_feedback_tokens": 48}
SENSORS = ["top_logprobs", "auto"]


def _engine_requests() -> float:
    """Requests the engine has finished, by its own count (every generation call of every policy)."""
    text = httpx.get(f"http://127.0.0.1:{ENGINE_PORT}/metrics", timeout=10).text
    return metric_total(text, "vllm:request_success_total")


def _auto(client: OpenAI, refine: dict, **body: object):
    return client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        seed=0,
        max_tokens=48,
        extra_body={"refine": {"policy": "auto", **refine}},
        **body,
    )


@pytest.mark.engine
@pytest.mark.parametrize("sensor", SENSORS)
def test_engine_a_threshold_every_answer_reaches_never_escalates_at_the_cost_of_none(
    client: OpenAI, sensor: str
) -> None:
    before = _engine_requests()
    raw = _auto(client, {"escalate": {**CYBERV, "sensor": sensor}, "threshold": NEVER})
    calls = _engine_requests() - before
    resp = raw.parse()
    trace = resp.model_extra["refine"]["trace"]
    assert trace["escalated"] is False and trace["escalation"] is None, trace
    assert trace["sensor_source"] == ("engine" if sensor == "auto" else "top_logprobs")
    assert math.isfinite(trace["value"]) and trace["value"] > 0  # DeepConf's confidence, measured
    assert raw.headers["x-refine-escalated"] == "false" and raw.headers["x-refine-engine-calls"] == "1"
    assert calls == 1  # one engine request: what `none` costs
    # And it is `none`'s answer to the same call (CyberV's direct prompt, greedy), at none's price.
    direct = [
        {
            "role": "user",
            "content": QUESTION[0]["content"] + "\n\nAnswer directly, without explaining: "
            "reply with the final answer only.",
        }
    ]
    plain = client.chat.completions.create(
        model=MODEL, messages=direct, seed=0, max_tokens=48, temperature=0, extra_body={"refine": {"policy": "none"}}
    )
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert resp.usage.total_tokens == plain.usage.total_tokens


@pytest.mark.engine
@pytest.mark.parametrize("sensor", SENSORS)
def test_engine_a_threshold_no_answer_reaches_escalates_and_cyberv_makes_no_second_direct_call(
    client: OpenAI, sensor: str
) -> None:
    before = _engine_requests()
    raw = _auto(client, {"escalate": {**CYBERV, "sensor": sensor}, "threshold": ALWAYS})
    calls = _engine_requests() - before
    trace = raw.parse().model_extra["refine"]["trace"]
    assert trace["escalated"] is True and raw.headers["x-refine-escalated"] == "true", trace
    cyberv = trace["escalation"]
    assert trace["first_answer_reused"] and cyberv["direct_answer"] == "given"
    # Round 1 as CyberV makes it, counted from its own trace: one direct call (auto's), one batch of n - 1
    # reasoning samples, and a final-answer step for each candidate whose text marks no answer.
    finals = sum(c["answer_source"] != "own_text" for c in cyberv["candidates"])
    assert cyberv["rounds"]["round1"]["engine_calls"] == 1 + 1 + finals
    feedback = cyberv["rounds"].get("feedback", {}).get("engine_calls", 0)
    # vLLM counts each of a call's n sequences as a request: the direct answer, n - 1 reasoning samples, the
    # final steps and the feedback round. A second direct-answer call would make it one more.
    assert calls == 1 + (CYBERV["n"] - 1) + finals + feedback
    assert raw.headers["x-refine-engine-calls"] == str(1 + 1 + finals + feedback)  # API calls, not sequences


@pytest.mark.engine
def test_engine_other_escalations_run_on_the_clients_own_request(client: OpenAI) -> None:
    before = _engine_requests()
    raw = _auto(client, {"escalate": {"policy": "srgen"}, "threshold": ALWAYS})
    calls = _engine_requests() - before
    resp = raw.parse()
    trace = resp.model_extra["refine"]["trace"]
    assert trace["escalated"] is True and trace["first_call"] == "request" and not trace["first_answer_reused"]
    assert trace["escalation"]["engine_events"] == "reported" and calls == 2
    assert resp.choices[0].logprobs is None  # the measurement's logprobs are not the client's


@pytest.mark.engine
def test_engine_streaming_decides_before_the_first_content_chunk(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        seed=0,
        max_tokens=48,
        stream=True,
        extra_body={
            "refine": {
                "policy": "auto",
                "escalate": {**CYBERV, "sensor": "top_logprobs"},
                "threshold": NEVER,
                "progress": True,
            }
        },
    )
    chunks = list(stream)
    progress = chunks[0].model_extra["refine_progress"]
    assert progress["stage"] == "decided" and progress["escalated"] is False and not chunks[0].choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].model_extra["refine"]["trace"]["escalated"] is False


@pytest.mark.engine
@pytest.mark.parametrize(
    ("escalate", "param"),
    [
        ({"policy": "auto"}, "refine.escalate.policy"),
        ({"policy": "nope"}, "refine.escalate.policy"),
        ({"policy": "cyberv", "n": 1000}, "refine.escalate.n"),
    ],
)
def test_engine_bad_escalations_are_400s_naming_the_field(client: OpenAI, escalate: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _auto(client, {"escalate": escalate})
    assert refused.value.body["param"] == param


@pytest.mark.engine
def test_engine_escalates_to_deepconf_by_name(client: OpenAI) -> None:
    deepconf = {"policy": "deepconf", "warmup": 2, "max_traces": 2, "max_trace_tokens": 16}
    raw = _auto(client, {"escalate": deepconf, "threshold": ALWAYS})
    trace = raw.parse().model_extra["refine"]["trace"]
    assert trace["escalated"] is True and trace["escalate"] == "deepconf" and trace["first_call"] == "request"
    assert not trace["first_answer_reused"] and trace["escalation"] is not None
