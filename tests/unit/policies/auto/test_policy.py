"""policies.auto against scripted backends (no engine): the decision both ways, CyberV taking the first answer
instead of generating it, the client's request as the first call for other escalations, streaming.

tests/engine/test_auto.py runs it on the real model; tests/unit/proxy/test_auto_serving.py the server's checks."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from refine_server.policies.auto.params import AutoParams
from refine_server.policies.auto.policy import DECISIONS, ESCALATED_HEADER, AutoPolicy
from refine_server.policies.base import ENGINE_CALLS, PolicyCall, PolicyParams, PolicyRequestError, ResolvedPolicy
from refine_server.policies.cyberv.params import CyberVParams
from refine_server.policies.cyberv.policy import CyberVPolicy
from refine_server.policies.none import NonePolicy
from tests.conftest import MODEL, policy_call
from tests.unit.policies.cyberv.responses import DIRECT
from tests.unit.policies.cyberv.test_policy import _call, _unanimous

NEVER = -1e9  # a confidence every answer reaches
ALWAYS = 1e9  # one no answer reaches


def _auto_call(backend: Any, escalate: PolicyParams | None = None, **body: Any) -> PolicyCall:
    call = _call(backend, **body)
    call.nested = ResolvedPolicy(CyberVPolicy(), escalate or CyberVParams(n=4))
    return call


async def test_a_sure_first_answer_is_returned_at_the_cost_of_one_call() -> None:
    backend = _unanimous()
    call = _auto_call(backend)
    result = await AutoPolicy().complete(call, AutoParams(threshold=NEVER))
    assert backend.kinds() == ["direct"]
    assert result["choices"][0]["message"]["content"] == DIRECT
    # CyberV's direct call, made with its fields: greedy, CyberV's prompt, 20 alternatives for the confidence.
    sent = backend.calls[0]
    assert sent["temperature"] == 0.0 and sent["top_logprobs"] == 20 and "final answer only" in str(sent["messages"])
    trace = call.trace
    assert trace.data["escalated"] is False and trace.data["escalation"] is None
    assert trace.data["first_call"] == "cyberv_direct" and trace.data["sensor_source"] == "top_logprobs"
    assert trace.headers[ESCALATED_HEADER] == "false" and trace.values[ENGINE_CALLS.name] == 1
    assert trace.label_values[DECISIONS.name] == ("cyberv", "lowest_group_confidence", "false")
    # The value is DeepConf's score of the tokens the backend wrote (each top-2: p and (1 - p) * 0.8).
    lowest = trace.data["value"]
    assert lowest == pytest.approx(-(math.log(0.9) + math.log(0.08)) / 2, abs=1e-4)
    assert result["usage"]["completion_tokens"] == 4  # "The answer is 4.", one call


async def test_an_unsure_first_answer_escalates_and_cyberv_takes_it_as_candidate_0() -> None:
    backend, alone = _unanimous(), _unanimous()
    call = _auto_call(backend)
    result = await AutoPolicy().complete(call, AutoParams(threshold=ALWAYS))
    expected = await CyberVPolicy().complete(_call(alone), CyberVParams(n=4))
    assert backend.kinds().count("direct") == 1  # auto's: CyberV made no second direct-answer call
    # The same calls as CyberV alone, but for the alternatives auto's first call asks for (20, CyberV's 5).
    assert sorted(map(_without_alternatives, backend.calls)) == sorted(map(_without_alternatives, alone.calls))
    assert result["usage"] == expected["usage"]
    trace = call.trace.data
    assert trace["escalated"] is True and trace["first_answer_reused"] is True
    assert trace["escalation"]["direct_answer"] == "given"
    assert trace["escalation"]["candidates"][0]["completion_tokens"] == 4
    assert call.trace.headers[ESCALATED_HEADER] == "true"
    assert call.trace.values[ENGINE_CALLS.name] == len(backend.calls)


def _without_alternatives(body: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in body.items() if k != "top_logprobs"}, sort_keys=True)


async def test_a_cyberv_decoded_with_srgen_is_refused() -> None:
    call = _auto_call(_unanimous(), CyberVParams(n=4, decode={"policy": "srgen"}))
    with pytest.raises(PolicyRequestError) as refused:
        await AutoPolicy().complete(call, AutoParams())
    assert refused.value.param == "refine.escalate.decode"


class RelayBackend:
    """vLLM's chat endpoint for the client's own request: one answer with top logprobs; records the bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        self.bodies.append(body)
        top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in (("7", -0.05), ("8", -3.0))]
        item = {"token": "7", "logprob": -0.05, "bytes": [55], "top_logprobs": top[: body.get("top_logprobs", 0)]}
        return {
            "id": "chatcmpl-r",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "7"},
                    "finish_reason": "stop",
                    "logprobs": {"content": [item]},
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }

    async def plugin(self, model: str) -> None:
        return None


class Relaying(NonePolicy):
    """An escalation that relays the client's request again (as SRGen does)."""

    name = "srgen"


async def test_other_escalations_measure_the_clients_own_request_and_add_its_cost() -> None:
    backend = RelayBackend()
    call = policy_call("chat", {"model": MODEL, "messages": [{"role": "user", "content": "3 + 4?"}]}, backend)
    call.nested = ResolvedPolicy(Relaying(), PolicyParams())
    plain = await AutoPolicy().complete(call, AutoParams(signal="answer_margin", threshold=0.5))
    assert backend.bodies[0]["top_logprobs"] == 20 and backend.bodies[0]["messages"][-1]["content"] == "3 + 4?"
    assert plain["choices"][0]["logprobs"] is None  # the client did not ask for them
    assert call.trace.data["first_call"] == "request" and call.trace.data["escalated"] is False
    assert call.trace.data["value"] == pytest.approx(math.exp(-0.05) - math.exp(-3.0), abs=1e-4)

    call = policy_call("chat", {"model": MODEL, "messages": [{"role": "user", "content": "3 + 4?"}]}, backend)
    call.nested = ResolvedPolicy(Relaying(), PolicyParams())
    escalated = await AutoPolicy().complete(call, AutoParams(signal="answer_margin", threshold=0.99))
    assert len(backend.bodies) == 3 and "top_logprobs" not in backend.bodies[2]  # the escalation's own request
    assert escalated["usage"]["total_tokens"] == 12  # both calls
    assert call.trace.values[ENGINE_CALLS.name] == 2 and call.trace.data["first_answer_reused"] is False


async def test_streaming_sends_the_decision_before_the_plain_answer() -> None:
    backend = _unanimous()
    call = _auto_call(backend, stream=True)
    chunks = [c async for c in AutoPolicy().stream(call, AutoParams(threshold=NEVER, progress=True))]
    assert chunks[0]["choices"] == [] and chunks[0]["refine_progress"]["stage"] == "decided"
    assert chunks[0]["refine_progress"]["escalated"] is False
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:] if c["choices"])
    assert text == DIRECT and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert backend.kinds() == ["direct"]


async def test_streaming_an_escalation_streams_cyberv_with_the_first_answer_reused() -> None:
    backend = _unanimous()
    call = _auto_call(backend, stream=True)
    chunks = [c async for c in AutoPolicy().stream(call, AutoParams(threshold=ALWAYS))]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert backend.kinds().count("direct") == 1 and call.trace.data["escalation"]["decision"] == "accepted"


async def test_a_stream_asking_for_logprobs_is_refused() -> None:
    call = _auto_call(_unanimous(), stream=True, logprobs=True)
    with pytest.raises(PolicyRequestError) as refused:
        [c async for c in AutoPolicy().stream(call, AutoParams())]
    assert refused.value.param == "logprobs"
