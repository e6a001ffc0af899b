"""policies.deepconf against a scripted engine: the threshold from the warmup, the stop's wiring, the vote's
weights, the consensus stop, the budget, the top_logprobs fallback that aborts the stream, the 400s.

tests/engine/test_deepconf.py runs it on the real model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from refine_server.contract.params import TokenStatsParams
from refine_server.policies import LimitExceeded, PolicyRegistry
from refine_server.policies.base import STOPPED_TRACES, TOKENS_SAVED, TRACES, PolicyCall, PolicyRequestError
from refine_server.policies.confidence import group_confidences, threshold_from_warmup
from refine_server.policies.deepconf import DeepConfPolicy
from refine_server.policies.deepconf.params import DeepConfParams
from refine_server.policies.deepconf.streamed import WindowStop, read_trace
from refine_server.policies.token_stats import ChoiceTokenStats
from tests.conftest import MODEL, policy_call

QUESTION = "What is 2 + 2?"


@dataclass
class Script:
    """One trace as the engine would write it: a token per word, and each token's confidence."""

    answer: str
    confidences: list[float]

    @property
    def words(self) -> list[str]:
        filler = [f"w{chr(97 + i % 26)}" for i in range(len(self.confidences) - 4)]  # no digits: no answer
        return [*filler, "The", "answer", "is", f"{self.answer}."]


def _trace(answer: str, level: float, tokens: int = 12, dip: tuple[int, float] | None = None) -> Script:
    """A trace at confidence `level` throughout, or with the tokens from `dip[0]` on at `dip[1]`."""
    confidences = [level] * tokens
    if dip is not None:
        confidences[dip[0] :] = [dip[1]] * (tokens - dip[0])
    return Script(answer, confidences)


class ScriptedEngine:
    """Answers DeepConf's engine calls from a script, in order, as many traces per call as its n; with the
    sensor's stop, a trace ends as the plugin ends it: once `first_check` tokens exist and the window mean is
    below the threshold, the next token is end-of-sequence. Records every call (its sensor and fields)."""

    def __init__(self, call: PolicyCall, script: list[Script]):
        self.script, self.drawn = script, 0
        self.calls: list[dict[str, Any]] = []
        engine = call.engine

        async def available() -> None:
            return None

        async def chat_with_token_stats(
            purpose: str, messages: list[dict[str, Any]], *, sensor: TokenStatsParams, **fields: Any
        ) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
            self.calls.append({"purpose": purpose, "messages": messages, "sensor": sensor, **fields})
            cost = engine.spend.cost(purpose)
            cost.calls += 1
            batch = self.script[self.drawn : self.drawn + fields["n"]]
            self.drawn += len(batch)
            choices, stats = [], {}
            for i, trace in enumerate(batch):
                words, confidences, stopped_at = trace.words, list(trace.confidences), None
                if sensor.stop is not None:
                    means = group_confidences(confidences, sensor.stop.window)
                    below = [
                        j for j, m in enumerate(means) if j + 1 >= sensor.stop.first_check and m < sensor.stop.threshold
                    ]
                    if below:
                        stopped_at = below[0] + 1
                        words, confidences = words[:stopped_at], [*confidences[:stopped_at], 0.0]  # + the EOS
                choices.append(
                    {"index": i, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}
                )
                n = len(confidences)
                nan = [math.nan] * n
                stats[i] = ChoiceTokenStats(list(range(n)), nan, nan, nan, nan, confidences, 0, stopped_at=stopped_at)
                cost.completion_tokens += len(confidences)
            return {"choices": choices, "usage": {}}, stats

        engine.token_stats_unavailable = available  # type: ignore[method-assign]
        engine.chat_with_token_stats = chat_with_token_stats  # type: ignore[method-assign]


class NoPlugin:
    """A plain upstream: no plugin, chat streamed with top_logprobs from the script (one trace per stream, a
    token a chunk, the token's confidence as k equal alternatives); records how far each stream was read."""

    def __init__(self, script: list[Script]):
        self.script, self.drawn = script, 0
        self.bodies: list[dict[str, Any]] = []
        self.read: list[int] = []

    async def plugin(self, model: str) -> None:
        return None

    async def stream_json(self, path: str, body: dict[str, Any], *, endpoint: str):
        assert (path, endpoint) == ("/v1/chat/completions", "chat") and body["stream"]
        self.bodies.append(body)
        trace = self.script[self.drawn]
        self.drawn += 1
        slot = len(self.read)
        self.read.append(0)
        k = body["top_logprobs"]
        for j, (word, c) in enumerate(zip(trace.words, trace.confidences)):
            self.read[slot] = j + 1
            item = {"token": word, "logprob": -c, "top_logprobs": [{"token": word, "logprob": -c}] * k}
            last = j == len(trace.words) - 1
            yield {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": (" " if j else "") + word},
                        "logprobs": {"content": [item]},
                        "finish_reason": "stop" if last else None,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": j + 1},
            }


def _call(backend: object = None, endpoint: str = "chat", **body: Any) -> PolicyCall:
    base = (
        {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}]}
        if endpoint == "chat"
        else {"model": MODEL, "prompt": QUESTION}
    )
    return policy_call(endpoint, {**base, **body}, backend or NoPlugin([]))


async def _run(script: list[Script], **params: Any) -> tuple[dict[str, Any], dict[str, Any], ScriptedEngine]:
    call = _call(seed=3)
    engine = ScriptedEngine(call, script)
    body = await DeepConfPolicy().complete(call, DeepConfParams(**params))
    return body, call.trace.data, engine


# ---- the online loop ---------------------------------------------------------------------------------------


async def test_threshold_comes_from_the_warmup_and_later_traces_run_with_the_stop_at_it() -> None:
    warmup = [_trace("4", c) for c in (10.0, 12.0, 14.0, 16.0)]
    later = [_trace("4", 15.0), _trace("5", 15.0, dip=(4, 2.0)), _trace("4", 15.0), _trace("4", 15.0)]
    body, trace, engine = await _run([*warmup, *later], window=4, tau=None, max_traces=8, variant="high")

    ChatCompletion.model_validate(body)
    s = threshold_from_warmup([10.0, 12.0, 14.0, 16.0], "high")
    assert (
        trace["summary"]["threshold"] == pytest.approx(s, abs=1e-4)
        and trace["summary"]["threshold_source"] == "warmup (high)"
    )
    first, second = engine.calls
    assert first["purpose"] == "warmup" and first["n"] == 4 and first["sensor"].stop is None
    assert second["purpose"] == "final" and second["n"] == 4
    stop = second["sensor"].stop
    assert (stop.threshold, stop.window, stop.first_check) == (pytest.approx(s), 4, 4)
    assert first["sensor"].confidence_k == second["sensor"].confidence_k == 20
    assert first["temperature"] == 0.6 and first["top_p"] == 0.95 and first["max_tokens"] == 256
    assert first["seed"] != second["seed"] and first["messages"] == [{"role": "user", "content": QUESTION}]
    # s = 10.6; the dipping trace's window means: 15, ..., 11.75 (index 4), 8.5 (index 5): the next token is EOS.
    # It was stopped there and does not vote (its text ends where it was cut).
    stopped = trace["traces"][5]
    assert stopped["stopped_low_confidence"] is True and stopped["stopped_at"] == 6 and stopped["votes"] is False
    assert stopped["answer"] is None and stopped["min_group_confidence"] < s
    assert [t["stopped_low_confidence"] for t in trace["traces"]] == [False] * 5 + [True, False, False]
    # The warmup trace below s does not vote either (the reproduce script's rule); the others weigh their scores.
    assert [t["votes"] for t in trace["traces"]] == [False, True, True, True, True, False, True, True]
    assert trace["traces"][1]["weight"] == trace["traces"][1]["min_group_confidence"] == 12.0
    assert trace["summary"]["stopped_early"] == 1 and trace["summary"]["traces_drawn"] == 8
    assert trace["chosen"]["answer"] == "4" and "The answer is 4." in body["choices"][0]["message"]["content"]


async def test_vote_weights_follow_the_confidences_and_majority_counts_heads() -> None:
    # Two confident traces say 7, three hesitant ones say 9: weighted, 7 wins; counted, 9 does.
    script = [_trace("7", 20.0), _trace("9", 5.0), _trace("7", 19.0), _trace("9", 5.5), _trace("9", 6.0)]
    common = {"warmup": 5, "max_traces": 5, "tau": None, "early_stop": False}
    _, weighted, _ = await _run(script, **common)
    assert [t["weight"] for t in weighted["traces"]] == [t["min_group_confidence"] for t in weighted["traces"]]
    assert weighted["chosen"]["answer"] == "7" and weighted["chosen"]["trace"] == 0  # its most confident voter
    assert weighted["answers"][0] == {"answer": "7", "kind": "number", "weight": 39.0, "traces": [0, 2]}
    assert weighted["summary"]["consensus"] == pytest.approx(39 / 55.5, abs=1e-4)
    _, counted, _ = await _run(script, vote="majority", **common)
    assert [t["weight"] for t in counted["traces"]] == [1.0] * 5 and counted["chosen"]["answer"] == "9"


async def test_a_unanimous_warmup_reaches_the_consensus_and_draws_nothing_more() -> None:
    _, trace, engine = await _run([_trace("4", 10.0 + i) for i in range(4)], tau=0.95, max_traces=16)
    assert len(engine.calls) == 1 and trace["summary"]["consensus_reached"] is True
    assert trace["summary"]["consensus"] == 1.0 and trace["summary"]["traces_drawn"] == 4
    # The 12 traces not drawn, at the mean length of those that ran in full.
    assert trace["summary"]["tokens_saved_estimate"] == {"stopped_traces": 0, "undrawn_traces": 12 * 12, "total": 144}


async def test_the_consensus_stops_drawing_after_the_batch_that_reaches_it() -> None:
    # Warmup split 2:1 (one answerless) -> draw; after one batch of 2 agreeing traces, 4 of 5 voters agree.
    warmup = [_trace("4", 10.0), _trace("5", 10.0), _trace("4", 10.0), _trace("4", 10.0)]
    later = [_trace("4", 10.0)] * 8
    _, trace, engine = await _run([*warmup, *later], tau=0.8, batch_size=2, max_traces=12, window=4)
    assert [c["n"] for c in engine.calls] == [4, 2] and trace["summary"]["traces_drawn"] == 6
    assert trace["summary"]["consensus"] == pytest.approx(5 / 6, abs=1e-4) and trace["summary"]["consensus_reached"]


async def test_without_consensus_the_budget_bounds_the_traces_and_the_last_batch_is_cut_to_it() -> None:
    script = [_trace(str(i % 3), 10.0) for i in range(20)]
    _, trace, engine = await _run(script, warmup=3, batch_size=4, max_traces=9)
    assert [c["n"] for c in engine.calls] == [3, 4, 2] and trace["summary"]["traces_drawn"] == 9
    assert not trace["summary"]["consensus_reached"]


async def test_a_fixed_threshold_skips_the_warmup_and_a_threshold_above_every_trace_stops_them_all() -> None:
    script = [_trace("4", 3.0, tokens=20) for _ in range(4)]
    body, trace, engine = await _run(script, threshold=1e6, max_traces=4, window=4, stop_after=6)
    assert [c["purpose"] for c in engine.calls] == ["final"] and engine.calls[0]["sensor"].stop.first_check == 6
    assert all(t["stopped_at"] == 6 and t["phase"] == "final" for t in trace["traces"])
    assert trace["summary"]["threshold_source"] == "given" and trace["summary"]["stopped_early"] == 4
    # Nothing qualifies and nothing has an answer (each was cut before it): the most confident trace is returned.
    assert trace["chosen"]["answer"] is None and body["choices"][0]["message"]["content"]


async def test_metrics_report_traces_drawn_stopped_and_tokens_saved() -> None:
    warmup = [_trace("4", c) for c in (10.0, 12.0, 14.0, 16.0)]
    later = [_trace("4", 15.0, tokens=20, dip=(2, 1.0))] * 4
    call = _call()
    ScriptedEngine(call, [*warmup, *later])
    await DeepConfPolicy().complete(call, DeepConfParams(window=4, tau=None, max_traces=8))
    values = call.trace.values
    assert values[TRACES.name] == 8 and values[STOPPED_TRACES.name] == 4
    # Each later trace was cut at 4 tokens + the EOS; the warmup's ran to 12.
    assert values[TOKENS_SAVED.name] == 4 * (12 - 5) == call.trace.data["summary"]["tokens_saved_estimate"]["total"]


# ---- without refine's plugin: the proxy reads top_logprobs and aborts the stream ----------------------------


def test_window_stop_acts_once_enough_tokens_exist_and_the_window_mean_is_below() -> None:
    stop = WindowStop(threshold=5.0, window=3, first_check=4)
    # Means over the last 3: 9, 6.5(2), 5.33, 3.67 -> below at the 4th token, the first it may act on.
    assert [stop.push(c) for c in (9.0, 4.0, 3.0, 4.0)] == [False, False, False, True]
    early = WindowStop(threshold=5.0, window=3, first_check=1)
    assert early.push(1.0) is True
    steady = WindowStop(threshold=5.0, window=2, first_check=1)
    assert not any(steady.push(c) for c in (6.0, math.nan, 5.0, 7.0))


async def test_read_trace_aborts_the_stream_at_the_stop() -> None:
    backend = NoPlugin([_trace("4", 9.0, tokens=30, dip=(10, 1.0))])
    body = {"model": MODEL, "stream": True, "top_logprobs": 5}
    got = await read_trace(backend.stream_json("/v1/chat/completions", body, endpoint="chat"), 5, WindowStop(5.0, 4, 4))
    # Window means over 4: 9 until token 10; (9*3+1)/4 = 7, 5, 3 -> below at token 13.
    assert got.stopped_at == 13 and len(got.confidences) == 13 and backend.read == [13]
    assert got.text == " ".join(Script("4", [0.0] * 30).words[:13]) and got.finish_reason == "stop"
    assert got.confidences[0] == pytest.approx(9.0)


async def test_without_the_plugin_every_trace_is_streamed_with_top_logprobs_and_aborted_in_the_proxy() -> None:
    warmup = [_trace("4", c, tokens=30) for c in (10.0, 12.0, 14.0, 16.0)]
    later = [_trace("4", 15.0, tokens=30), _trace("5", 15.0, tokens=30, dip=(8, 1.0))]
    backend = NoPlugin([*warmup, *later])
    call = _call(backend, seed=1)
    body = await DeepConfPolicy().complete(
        call, DeepConfParams(window=4, max_traces=6, batch_size=2, tau=None, confidence_k=7)
    )
    trace = call.trace.data
    assert trace["summary"]["sensor_source"] == "top_logprobs"
    assert all(b["logprobs"] is True and b["top_logprobs"] == 7 and "n" not in b for b in backend.bodies)
    assert all(b["temperature"] == 0.6 and b["stream_options"]["include_usage"] for b in backend.bodies)
    assert len({b["seed"] for b in backend.bodies}) == 6  # each trace its own stream and seed
    assert backend.read[:5] == [30] * 5 and backend.read[5] < 30  # the dipping trace's stream was left early
    assert trace["traces"][5]["stopped_low_confidence"] and trace["traces"][5]["stopped_at"] == backend.read[5]
    assert trace["chosen"]["answer"] == "4" and body["usage"]["completion_tokens"] == sum(backend.read)


class NoLogprobs(NoPlugin):
    """An upstream that streams the traces but never sends logprobs (not vLLM)."""

    async def stream_json(self, path: str, body: dict[str, Any], *, endpoint: str):
        async for chunk in super().stream_json(path, body, endpoint=endpoint):
            chunk["choices"][0].pop("logprobs")
            yield chunk


async def test_an_upstream_without_logprobs_leaves_deepconf_its_unweighted_vote() -> None:
    backend = NoLogprobs([_trace("4", 1.0), _trace("5", 1.0), _trace("4", 1.0), _trace("4", 1.0)])
    call = _call(backend, seed=1)
    body = await DeepConfPolicy().complete(call, DeepConfParams(warmup=2, max_traces=4, batch_size=2, tau=None))
    trace = call.trace.data
    assert trace["summary"]["confidence_missing"] is True and trace["summary"]["threshold"] is None
    assert [t["weight"] for t in trace["traces"]] == [1.0] * 4 and backend.read == [12] * 4  # none stopped
    assert trace["chosen"]["answer"] == "4" and "4" in body["choices"][0]["message"]["content"]


# ---- streaming, the request, the parameters ----------------------------------------------------------------


async def test_stream_sends_progress_then_the_chosen_answer() -> None:
    call = _call(stream=True, stream_options={"include_usage": True})
    ScriptedEngine(call, [_trace("4", 10.0)] * 2 + [_trace("5", 10.0)] * 2 + [_trace("4", 10.0)] * 4)
    chunks = [c async for c in DeepConfPolicy().stream(call, DeepConfParams(progress=True, batch_size=4, max_traces=8))]
    stages = [c["refine_progress"]["stage"] for c in chunks if "refine_progress" in c]
    assert stages == ["warmup_done", "batch_done", "decided"] and all(not c["choices"] for c in chunks[:3])
    assert chunks[0]["refine_progress"]["traces"] == 4 and chunks[1]["refine_progress"]["consensus"] == 0.75
    answer = [ChatCompletionChunk.model_validate(c) for c in chunks[3:-1]]
    assert answer[0].choices[0].delta.role == "assistant" and answer[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in answer).endswith("The answer is 4.")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8 * 12
    assert call.trace.data["chosen"]["answer"] == "4"


async def test_completions_endpoint_answers_as_a_completion() -> None:
    call = _call(endpoint="completions")
    engine = ScriptedEngine(call, [_trace("4", 10.0)] * 4)
    body = await DeepConfPolicy().complete(call, DeepConfParams())
    Completion.model_validate(body)
    assert body["choices"][0]["text"].endswith("The answer is 4.")
    assert engine.calls[0]["messages"] == [{"role": "user", "content": QUESTION}]


@pytest.mark.parametrize(
    "endpoint, body, param",
    [
        ("chat", {"n": 2}, "n"),
        ("completions", {"prompt": [1, 2]}, "prompt"),
        ("chat", {"messages": [{"role": "user", "content": " "}]}, "messages"),
    ],
)
async def test_requests_deepconf_cannot_answer_are_400(endpoint: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(PolicyRequestError) as err:
        await DeepConfPolicy().complete(_call(endpoint=endpoint, **body), DeepConfParams())
    assert (err.value.status, err.value.param) == (400, param)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"threshold": math.inf}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"window": 0}, "window"),
        ({"confidence_k": 0}, "confidence_k"),
        ({"confidence_k": 21}, "confidence_k"),
        ({"tau": 1.5}, "tau"),
        ({"warmup": 8, "max_traces": 4}, "max_traces"),
        ({"variant": "medium"}, "variant"),
    ],
)
def test_bad_parameters_name_their_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        PolicyRegistry([DeepConfPolicy]).resolve("deepconf", params)
    assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("field, value", [("max_traces", 65), ("window", 4097), ("max_trace_tokens", 4097)])
def test_caps(field: str, value: int) -> None:
    with pytest.raises(LimitExceeded) as err:
        PolicyRegistry([DeepConfPolicy]).resolve("deepconf", {field: value})
    assert err.value.param == field
    tighter = PolicyRegistry([DeepConfPolicy], {"deepconf": {"max_traces": 8}})
    with pytest.raises(LimitExceeded):
        tighter.resolve("deepconf", {"max_traces": 9})


def test_trace_entries_are_json() -> None:
    # NaN never reaches the client: a trace without confidences reports null.
    from refine_server.policies.confidence import trace_confidence

    assert json.dumps(trace_confidence([], 4).as_dict(), allow_nan=False)


def test_a_fixed_threshold_needs_no_room_for_a_warmup() -> None:
    assert DeepConfParams(threshold=5.0, max_traces=2).max_traces == 2
