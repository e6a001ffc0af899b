"""policies.cyberv: its parameters, and the whole policy against a scripted backend (no engine).

tests/engine/test_cyberv.py runs the loop on the real model."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from refine_server.errors import APIError
from refine_server.metrics import Metrics
from refine_server.policies import LimitExceeded, PolicyRegistry
from refine_server.policies.base import (
    CORRECTION_SECONDS,
    CORRECTIONS,
    EXTRA_TOKENS,
    ROUNDS,
    PolicyCall,
    PolicyRequestError,
)
from refine_server.policies.cyberv.policy import CyberVParams, CyberVPolicy, split_for_streaming
from refine_server.policies.relayed import CHOICE_CHUNKS
from refine_server.streaming import ChunkRelay, StreamLatency
from tests.conftest import MODEL, policy_call
from tests.unit.policies.cyberv.responses import DIRECT, SPIKE_WORD, _choice, _response

FINAL_MARK = "\nTo conclude, I state the final answer"


# ---- a scripted backend ----------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Answers cyberv's engine calls as vLLM's chat endpoint would, from a script; records every call.

    Reasoning samples are handed out in script order, as many per call as the call's `n`. `finals` maps a
    candidate's text to its final-answer step: (continuation, probability of its first token).
    """

    def __init__(self, direct: str, reasoning: list[str], finals: dict[str, tuple[str, float]], feedback: str = ""):
        self.direct, self.reasoning, self.finals, self.feedback = direct, reasoning, finals, feedback
        self.calls: list[dict[str, Any]] = []
        self.drawn = 0

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        assert (path, endpoint) == ("/v1/chat/completions", "chat")
        self.calls.append(body)
        last = body["messages"][-1]["content"]
        if body.get("continue_final_message"):
            continuation, prob = self.finals[last.split(FINAL_MARK)[0]]
            return _response([_choice(continuation, first_prob=prob)])
        if "Recheck" in last:
            return _response([_choice(self.feedback)])
        if "step by step" in last:
            batch = self.reasoning[self.drawn : self.drawn + body.get("n", 1)]
            self.drawn += len(batch)
            return _response([_choice(t, i) for i, t in enumerate(batch)])
        return _response([_choice(self.direct)])

    async def plugin(self, model: str) -> None:
        return None  # a plain vLLM: cyberv reads its sensor from top_logprobs

    def kinds(self) -> list[str]:
        def kind(body: dict[str, Any]) -> str:
            if body.get("continue_final_message"):
                return "final"
            last = body["messages"][-1]["content"]
            return "feedback" if "Recheck" in last else "reasoning" if "step by step" in last else "direct"

        return [kind(b) for b in self.calls]


def _unanimous(n: int = 8) -> ScriptedBackend:
    reasoning = [f"Two plus two makes four. Sample {i}. The answer is 4." for i in range(1, n)]
    finals = dict.fromkeys([DIRECT, *reasoning], (" 4.", 0.95))
    return ScriptedBackend(DIRECT, reasoning, finals)


def _split(feedback: str) -> ScriptedBackend:
    """Eight candidates, four answers, every one unsure: no answer can pass the gate."""
    reasoning = [f"Counting {SPIKE_WORD} gives {k}. The answer is {k}." for k in (3, 5, 5, 6, 6, 7, 3)]
    finals = {text: (f" {text.split()[-1]}", 0.3) for text in reasoning}
    finals[DIRECT] = (" 4.", 0.3)
    return ScriptedBackend(DIRECT, reasoning, finals, feedback)


def _call(backend: ScriptedBackend, endpoint: str = "chat", **body: Any) -> PolicyCall:
    question = "What is 2 + 2?"
    base = (
        {"model": MODEL, "messages": [{"role": "user", "content": question}]}
        if endpoint == "chat"
        else {"model": MODEL, "prompt": question}
    )
    return policy_call(endpoint, {**base, **body}, backend)


# ---- parameters and streaming pieces ---------------------------------------------------------------------------------


def test_streaming_pieces_join_back_exactly() -> None:
    for text in ["", "one", "  lead and trail  ", "a b c d e f g h i\n\nj k"]:
        pieces = split_for_streaming(text)
        assert "".join(pieces) == text
        assert all(len(p.split()) <= 4 for p in pieces)


def test_params_and_limits() -> None:
    registry = PolicyRegistry([CyberVPolicy])
    _, params = registry.resolve("cyberv", {})
    assert params.model_dump() == {
        "n": 8,
        "theta": 0.3,
        "reasoning_temperature": 1.0,
        "reasoning_top_p": 0.5,
        "reasoning_top_k": 5,
        "max_reasoning_tokens": 256,
        "feedback_temperature": 0.01,
        "max_feedback_tokens": 256,
        "adaptive": True,
        "batch_size": 2,
        "stop_risk": 0.05,
        "decode": None,
        "sensor": "auto",
        "progress": False,
        "confidence_stop": False,
        "vote": "score",
        "confidence_window": 64,
        "confidence_variant": "high",
    }
    with pytest.raises(LimitExceeded):
        registry.resolve("cyberv", {"n": 17})
    with pytest.raises(LimitExceeded):
        registry.resolve("cyberv", {"max_feedback_tokens": 4096})
    with pytest.raises(ValueError):
        registry.resolve("cyberv", {"temperature": 0.5})  # a typo of reasoning_temperature is an error


# ---- the policy against a scripted backend ---------------------------------------------------------------


async def test_unanimous_request_is_answered_in_one_round_and_stops_drawing_once_settled() -> None:
    backend = _unanimous()
    call = _call(backend, seed=7, max_tokens=100)
    body = await CyberVPolicy().complete(call, CyberVParams(stop_risk=0))

    ChatCompletion.model_validate(body)
    trace = call.trace.data
    assert trace["decision"] == "accepted" and trace["feedback"] is None
    assert _reported(call) == {
        "corrections": 0,
        "correction_seconds": 0,
        "rounds": 1,
        "extra_tokens": body["usage"]["completion_tokens"] - _chosen_tokens(backend, trace),
    }
    assert trace["answers"][0]["answer"] == "4" and trace["threshold"] == 2.4
    chosen = trace["candidates"][trace["chosen"]["candidate"]]
    assert body["choices"][0]["message"]["content"] == backend.reasoning[chosen["index"] - 1]
    assert body["model"] == MODEL and body["choices"][0]["finish_reason"] == "stop"
    assert _reported(call)["extra_tokens"] > 0

    # Adaptive round 1, stopping only when certain: the direct answer with a first batch of 2 samples, then 2
    # more; five agreeing candidates cannot be outvoted by the three left, so it stops. Every answer is marked
    # in its own text, so no final-answer step runs.
    assert backend.kinds() == ["direct", "reasoning", "reasoning"]
    assert trace["round1"] == {
        "planned": 8,
        "drawn": 5,
        "adaptive": True,
        "stopped_early": True,
        "stop_certain": True,
        "stop_reason": trace["round1"]["stop_reason"],
    }
    assert trace["round1"]["stop_reason"].startswith("after 5 of 8 candidates, answer 4 has")
    assert [c["answer_source"] for c in trace["candidates"]] == ["own_text"] * 5
    assert trace["rounds"] == {
        "round1": {
            "engine_calls": 3,
            "prompt_tokens": 30,
            "completion_tokens": body["usage"]["completion_tokens"],
            "total_tokens": body["usage"]["total_tokens"],
        }
    }
    direct, first, second = backend.calls
    assert direct["temperature"] == 0 and direct["logprobs"] and direct["top_logprobs"] == 5
    assert "Answer directly" in direct["messages"][-1]["content"]
    assert {k: first[k] for k in ("n", "temperature", "top_p", "top_k", "top_logprobs", "max_tokens")} == {
        "n": 2,
        "temperature": 1.0,
        "top_p": 0.5,
        "top_k": 5,
        "top_logprobs": 5,
        "max_tokens": 100,
    }
    assert "step by step" in first["messages"][-1]["content"] and second["n"] == 2
    # Each batch is seeded: distinct seeds derived from the client's, so batches are not copies of each other.
    assert direct["seed"] == 7 and len({direct["seed"], first["seed"], second["seed"]}) == 3
    assert all(b["model"] == MODEL for b in backend.calls)


async def test_by_default_round1_stops_on_a_forecast_and_says_it_was_not_certain() -> None:
    backend = _unanimous()
    call = _call(backend)
    await CyberVPolicy().complete(call, CyberVParams())
    round1 = call.trace.data["round1"]
    # Three agreeing candidates: five more could still outvote them, but in no forecast completion do they.
    assert backend.kinds() == ["direct", "reasoning"] and round1["drawn"] == 3 and round1["stop_certain"] is False
    assert "forecast completions of the other 5 (stop_risk 0.05)" in round1["stop_reason"], round1
    assert call.trace.data["decision"] == "accepted" and call.trace.data["chosen"]["answer"] == "4"


async def test_without_adaptive_all_n_candidates_are_drawn_in_one_call() -> None:
    backend = _unanimous()
    call = _call(backend)
    await CyberVPolicy().complete(call, CyberVParams(adaptive=False))
    assert backend.kinds() == ["direct", "reasoning"] and backend.calls[1]["n"] == 7
    assert call.trace.data["round1"]["drawn"] == 8 and not call.trace.data["round1"]["stopped_early"]


async def test_unmarked_answers_come_from_the_final_step_and_the_returned_text_states_the_chosen_one() -> None:
    reasoning = [f"Two plus two makes four, sample {i}." for i in range(1, 4)]
    finals = dict.fromkeys(reasoning, (" 4.\nThat is all.", 0.95))
    finals["Hmm, I would say it is four."] = (" 4.", 0.95)
    backend = ScriptedBackend("Hmm, I would say it is four.", reasoning, finals)
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams(n=4, adaptive=False))

    trace = call.trace.data
    assert sorted(backend.kinds()) == ["direct", "final", "final", "final", "final", "reasoning"]
    assert [c["answer_source"] for c in trace["candidates"]] == ["final_step"] * 4
    final = next(b for b, k in zip(backend.calls, backend.kinds()) if k == "final")
    assert final["add_generation_prompt"] is False and final["continue_final_message"] is True
    assert final["temperature"] == 0 and final["messages"][-1]["role"] == "assistant"
    assert final["messages"][-1]["content"].endswith("Therefore, the final answer is:")
    text = body["choices"][0]["message"]["content"]
    chosen = trace["candidates"][trace["chosen"]["candidate"]]
    source = backend.direct if chosen["index"] == 0 else reasoning[chosen["index"] - 1]
    assert text == f"{source}\n\nTherefore, the final answer is: 4."


async def test_an_answer_nobody_marked_or_stated_falls_back_to_the_text() -> None:
    backend = ScriptedBackend(
        "I think 2 + 2 is 4 here",
        ["First 3, then 9 in the end"],
        {"I think 2 + 2 is 4 here": (" unclear", 0.5), "First 3, then 9 in the end": (" unclear", 0.5)},
    )
    call = _call(backend)
    await CyberVPolicy().complete(call, CyberVParams(n=2))
    candidates = call.trace.data["candidates"]
    assert [(c["answer"], c["answer_source"]) for c in candidates] == [("4", "unmarked_text"), ("9", "unmarked_text")]


async def test_split_request_gets_a_feedback_round_whose_known_answer_is_accepted() -> None:
    backend = _split("Rechecking the count, it is 5. The answer is 5.")
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams())

    trace = call.trace.data
    assert trace["decision"] == "feedback"
    assert trace["feedback"]["accepted"] is True and trace["feedback"]["answer"] == "5"
    assert SPIKE_WORD in trace["feedback"]["span"]
    assert trace["chosen"] == {"source": "feedback", "candidate": None, "answer": "5"}
    assert body["choices"][0]["message"]["content"] == backend.feedback
    reported = _reported(call)
    assert reported["corrections"] == 1 and reported["correction_seconds"] > 0 and reported["rounds"] == 2
    assert reported["extra_tokens"] == trace["rounds"]["round1"]["completion_tokens"]
    assert trace["rounds"]["feedback"]["engine_calls"] == 1
    assert body["usage"]["total_tokens"] == sum(r["total_tokens"] for r in trace["rounds"].values())
    feedback_call = backend.calls[-1]
    assert feedback_call["temperature"] == 0.01 and feedback_call["max_tokens"] == 256
    assert trace["feedback"]["span"].strip(".") in feedback_call["messages"][-1]["content"]


async def test_feedback_answer_not_among_round1_answers_is_rejected() -> None:
    backend = _split("After rechecking, the answer is 99.")
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams())

    trace = call.trace.data
    assert trace["feedback"]["accepted"] is False and "not among the round-1 answers" in trace["feedback"]["reason"]
    best = trace["chosen"]["candidate"]
    assert trace["chosen"]["source"] == "candidate" and trace["chosen"]["answer"] == trace["answers"][0]["answer"]
    assert body["choices"][0]["message"]["content"] == backend.reasoning[best - 1]
    assert _reported(call)["corrections"] == 1


async def test_no_extractable_answer_returns_the_direct_answer_without_feedback() -> None:
    vague = " no idea, since the question could mean many different things really"
    unsure = "Hmm, I am not sure about this one."
    backend = ScriptedBackend(unsure, ["Let me think."] * 3, {unsure: (vague, 0.5), "Let me think.": (vague, 0.5)})
    call = _call(backend)
    body = await CyberVPolicy().complete(call, CyberVParams(n=4))

    assert call.trace.data["decision"] == "no_answer" and "feedback" not in backend.kinds()
    assert all(c["answer"] is None for c in call.trace.data["candidates"])
    assert body["choices"][0]["message"]["content"] == unsure


async def test_completions_endpoint_uses_the_chat_backend_and_answers_as_a_completion() -> None:
    backend = _unanimous(n=3)
    call = _call(backend, endpoint="completions")
    body = await CyberVPolicy().complete(call, CyberVParams(n=3))

    Completion.model_validate(body)
    assert body["object"] == "text_completion" and body["choices"][0]["text"].endswith("The answer is 4.")
    assert all(
        b["messages"][0]["role"] == "user" and "What is 2 + 2?" in b["messages"][0]["content"] for b in backend.calls
    )


async def test_chat_history_is_kept_and_the_last_user_message_is_the_question() -> None:
    backend = _unanimous(n=2)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
    ]
    call = policy_call("chat", {"model": MODEL, "messages": messages}, backend)
    await CyberVPolicy().complete(call, CyberVParams(n=2))
    for body in backend.calls:
        assert body["messages"][:3] == messages[:3]
        assert "What is 2 + 2?" in body["messages"][3]["content"]


@pytest.mark.parametrize(
    "endpoint, body, param",
    [
        ("chat", {"n": 2}, "n"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("completions", {"prompt": "  "}, "prompt"),
        ("chat", {"messages": [{"role": "user", "content": ""}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
        ),
    ],
)
async def test_requests_cyberv_cannot_answer_are_400(endpoint: str, body: dict[str, Any], param: str) -> None:
    backend = _unanimous()
    call = _call(backend, endpoint=endpoint, **body)
    with pytest.raises(PolicyRequestError) as err:
        await CyberVPolicy().complete(call, CyberVParams())
    assert (err.value.status, err.value.param) == (400, param)
    with pytest.raises(PolicyRequestError):
        await anext(CyberVPolicy().stream(call, CyberVParams()))
    assert backend.calls == []


def _reported(call: PolicyCall) -> dict[str, float]:
    """The metric values cyberv reported for one request, by short name."""
    names = {
        CORRECTIONS: "corrections",
        CORRECTION_SECONDS: "correction_seconds",
        ROUNDS: "rounds",
        EXTRA_TOKENS: "extra_tokens",
    }
    return {short: call.trace.values[m.name] for m, short in names.items() if m.name in call.trace.values}


def _chosen_tokens(backend: ScriptedBackend, trace: dict[str, Any]) -> int:
    chosen = trace["candidates"][trace["chosen"]["candidate"]]
    return len(backend.reasoning[chosen["index"] - 1].split())  # the scripted backend: a token per word


class _OneChoice:
    """The request side of a relayed stream (streaming.RelayedRequest), as refine's serving object plays it."""

    n_choices = 1
    stream_format = CHOICE_CHUNKS

    def __init__(self, call: PolicyCall):
        self._call = call
        self._metrics = Metrics({"cyberv": CyberVPolicy.metrics})

    def latency(self) -> StreamLatency:
        return StreamLatency(
            self._metrics.ttft.labels("cyberv"), self._metrics.itl.labels("cyberv"), time.perf_counter()
        )

    def refine_block(self) -> dict[str, Any]:
        return {"policy": "cyberv", "trace": self._call.trace.data}

    async def reopen(self, failure: APIError) -> Any:
        raise failure

    def finished(self, status: int) -> None:
        pass

    def error_body(self, error: APIError) -> dict[str, Any]:
        return error.body()


async def _relay(call: PolicyCall, params: CyberVParams) -> list[dict[str, Any]]:
    """The policy's stream as refine serves it (ChunkRelay attaches the refine block), parsed back from SSE."""
    chunks = CyberVPolicy().stream(call, params)
    relay = ChunkRelay(await anext(chunks), chunks, _OneChoice(call))
    events = [line.decode().removeprefix("data: ").strip() async for line in relay.events()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_stream_with_progress_sends_progress_then_the_answer_then_the_refine_block() -> None:
    backend = _split("Rechecking the count, it is 5. The answer is 5.")
    events = await _relay(_call(backend, stream=True), CyberVParams(progress=True))

    parsed = [ChatCompletionChunk.model_validate(e) for e in events]  # what the openai client does with each
    stages = [e["refine_progress"]["stage"] for e in events if "refine_progress" in e]
    assert stages == ["round1_done", "feedback_started", "decided"]
    assert all(not e["choices"] for e in events[:3])
    assert events[0]["refine_progress"]["threshold"] == 2.4 and len(events[0]["refine_progress"]["answers"]) == 5
    assert events[2]["refine_progress"] == {
        "stage": "decided",
        "decision": "feedback",
        "answer": "5",
        "feedback_accepted": True,
    }
    answer = parsed[3:]
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == backend.feedback
    assert len(answer) > 2  # streamed in pieces
    assert answer[-1].choices[0].finish_reason == "stop"
    assert [("refine" in e) for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["refine"]["trace"]["decision"] == "feedback"
    assert len({e["id"] for e in events}) == 1


async def test_stream_without_progress_is_plain_completion_chunks_with_usage_when_asked() -> None:
    backend = _unanimous(n=3)
    call = _call(backend, endpoint="completions", stream=True, stream_options={"include_usage": True})
    events = await _relay(call, CyberVParams(n=3))

    assert not any("refine_progress" in e for e in events)
    text_chunks, finishing, usage_chunk = events[:-2], Completion.model_validate(events[-2]), events[-1]
    # Like vLLM's, the pieces before the last have no finish_reason yet (the openai client does not validate them).
    assert all(e["object"] == "text_completion" and e["choices"][0]["finish_reason"] is None for e in text_chunks)
    assert "".join(e["choices"][0]["text"] for e in text_chunks).endswith("The answer is 4.")
    assert finishing.choices[0].finish_reason == "stop" and "refine" in events[-2]
    usage = Completion.model_validate(usage_chunk)
    assert usage.choices == [] and usage.usage.total_tokens == sum(
        r["total_tokens"] for r in call.trace.data["rounds"].values()
    )


async def test_a_failing_engine_call_fails_the_request_with_its_error() -> None:
    class Failing(ScriptedBackend):
        async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
            if body.get("n", 1) > 1:
                raise APIError(400, "top_k must be -1, 0 or at least 1")
            return await super().post_json(path, body, endpoint=endpoint)

    backend = _unanimous()
    failing = Failing(backend.direct, backend.reasoning, backend.finals)
    with pytest.raises(APIError, match="top_k"):
        await CyberVPolicy().complete(_call(failing), CyberVParams())


async def test_the_engine_sensor_is_used_where_the_upstream_reports_token_statistics() -> None:
    """With refine's plugin upstream, each token's entropy and margin are the engine's (whole vocabulary), and
    the API is asked for no alternatives; the spike is where the engine measured the highest entropy."""
    from refine_server.policies.token_stats import ChoiceTokenStats

    backend = _split("Rechecking the count, it is 5. The answer is 5.")
    call = _call(backend)
    engine = call.engine

    async def reports() -> None:
        return None

    async def chat_with_token_stats(purpose: str, messages: list[dict[str, Any]], **fields: Any):
        result = await engine.chat(purpose, messages, **fields)
        stats = {}
        for choice in result["choices"]:
            n = len(choice["logprobs"]["content"])
            # The engine's highest entropy is on each choice's first token, not on the scripted SPIKE_WORD.
            entropy = [3.0] + [0.1] * (n - 1)
            stats[choice["index"]] = ChoiceTokenStats([0] * n, entropy, [0.0] * n, [0.9] * n, [0.9] * n, [1.0] * n, 0)
        return result, stats

    engine.token_stats_unavailable = reports
    engine.chat_with_token_stats = chat_with_token_stats
    await CyberVPolicy().complete(call, CyberVParams())

    trace = call.trace.data
    assert trace["sensor_source"] == "engine"
    assert all(b["top_logprobs"] == 0 for b, k in zip(backend.calls, backend.kinds()) if k != "feedback")
    assert all(c["spike"]["offset"] == 0 and c["spike"]["entropy"] == 3.0 for c in trace["candidates"])


async def test_without_the_plugin_the_sensor_reads_top_logprobs() -> None:
    call = _call(_split("The answer is 5."))
    await CyberVPolicy().complete(call, CyberVParams())
    trace = call.trace.data
    assert trace["sensor_source"] == "top_logprobs"
    assert all(SPIKE_WORD in c["spike"]["token"] for c in trace["candidates"][1:])


# ---- decoding cyberv's engine calls with SRGen -----------------------------------------------------------------------


class PluginBackend(ScriptedBackend):
    """A scripted upstream with refine's plugin: each request that carries SRGen's signed xargs gets one
    correction event in its event file, as the plugin would write it."""

    def __init__(self, *args: Any, events_dir: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from refine_server.contract.protocol import EngineLink

        self.link = EngineLink(secret="s", events_dir=events_dir)

    async def plugin(self, model: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(handshake=SimpleNamespace(policies=["srgen"], signature="ok"))

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        from refine_server.contract.protocol import REQUEST_KEY_ARG, append_event

        key = (body.get("vllm_xargs") or {}).get(REQUEST_KEY_ARG)
        if key:
            assert body["cache_salt"] == key  # SRGen needs every position recomputed
            append_event(self.link.events_dir, key, {"event": "correction", "step": 1, "seconds": 0.01})
        return await super().post_json(path, body, endpoint=endpoint)


async def test_decode_with_srgen_runs_every_generation_in_its_own_srgen_request_and_traces_it(tmp_path) -> None:
    plain = _unanimous(n=4)
    backend = PluginBackend(plain.direct, plain.reasoning, plain.finals, events_dir=tmp_path)
    call = _call(backend, seed=3)
    params = CyberVParams(n=4, adaptive=False, decode={"policy": "srgen", "max_corrections": 2})
    await CyberVPolicy().complete(call, params)

    trace = call.trace.data
    # One request per candidate (a 3-sample batch became 3 requests), each with its own seed and key.
    assert backend.kinds() == ["direct", "reasoning", "reasoning", "reasoning"]
    assert all(b.get("n", 1) == 1 for b in backend.calls)
    assert len({b["seed"] for b in backend.calls[1:]}) == 3
    assert len({b["vllm_xargs"]["refine_request_key"] for b in backend.calls}) == 4
    assert json.loads(backend.calls[0]["vllm_xargs"]["refine_params"])["max_corrections"] == 2
    assert [c["decoded"]["generation"]["num_corrections"] for c in trace["candidates"]] == [1, 1, 1, 1]
    assert trace["decode"] == {"policy": "srgen", "generations": 4, "num_corrections": 4}
    assert trace["sensor_source"] == "top_logprobs"
    assert list(tmp_path.iterdir()) == []  # every event file read and removed


async def test_decode_is_a_400_where_the_upstream_cannot_run_srgen() -> None:
    call = _call(_unanimous())
    with pytest.raises(PolicyRequestError) as err:
        await CyberVPolicy().complete(call, CyberVParams(decode={"policy": "srgen"}))
    assert err.value.param == "refine.decode"
    with pytest.raises(ValueError):
        CyberVParams(decode={"policy": "rain"})  # only an in-engine policy can decode
