"""`auto`: answer plainly when the model is sure, escalate to a correcting policy only when it is not.

    {"policy": "auto", "escalate": {"policy": "cyberv", ...its parameters}, "signal": ..., "threshold": ...}

**The first answer.** One greedy-or-as-sent engine call with the token sensor on (`signals.py`: the engine's
sensor where the upstream reports it, else the API's top 20 logprobs). Its signal (DeepConf's lowest group
confidence by default) is compared with the threshold: on the sure side the first answer is returned, at the
cost of that one call; otherwise the escalation policy runs, and reuses the first answer where it can.

**Which call is the first one.** CyberV's candidate 0 is its direct answer, but not the client's request: it is
the question wrapped in CyberV's direct prompt (`cyberv/prompts/direct.txt`: the final answer only), greedy,
within `max_reasoning_tokens`, with the client's history and model. So when escalating to cyberv, auto's first
call IS that call (`cyberv.policy.direct_call`, made with CyberV's own sensor fields), the plain answer is
CyberV's direct answer, and on escalation CyberV takes the generation as candidate 0 instead of generating it:
an escalated request makes no second direct-answer call, and its engine calls and tokens are CyberV's own on
the same request. (With the API's logprobs the call asks for 20 alternatives instead of CyberV's 5, for the
confidence; CyberV is handed the top 5 of each, so its sensor reads what its own call would have shown.)
A CyberV that decodes with SRGen (`escalate.decode`) makes a different direct call: a 400.
For every other escalation the first call is the client's request as sent (the `none` policy, logprobs added
for the measurement and removed again), and nothing of it is reused:
- `srgen` and `rain` decode from the first token on in their own way (SRGen corrects inside the engine, RAIN
  searches), so no greedy answer is a part of their work;
- `deepconf` (once registered) is not given it as a warmup trace: its threshold is a percentile of the warmup
  traces' lowest group confidences, which are sampled at temperature; a greedy trace is systematically more
  confident, and with the small warmups refine runs (4) one such trace would move the 90th percentile most.
Their usage adds the first call's tokens: the response's usage is what the request cost.

**Threshold.** The request's `threshold`; else the model's calibration (`calibration.py`, for the kind of first
call); else the signal's default. The trace says which (`threshold_source`).

**Admission.** An escalated request is a request of the escalation policy too: before it runs, it waits for a
slot of that policy as a request of it would (`--policy-concurrency`), and its engine calls then carry that
policy's engine priority. Where no slot frees within the queue timeout the request keeps its first answer
rather than failing: it has one, and a 429 would throw it away. The header, the trace (`escalation_busy`) and
the decisions metric say `busy`. (Without admission, a burst of unsure auto requests would run any number of
CyberV rounds beside a limit of 2 for cyberv.)

**Streaming.** The first call is not streamed (its signal needs the whole answer): the decision comes before
any content (a `refine_progress` chunk with it when `progress` is set), then a plain answer is sent at once in
pieces of a few words, and an escalated one as its policy streams it. The `x-refine-escalated` header goes out
with the first chunk, after the decision.

Differences from the issue's wording, made for production: a signal that cannot be measured escalates; the
response's choice is the first answer's text and finish reason (chat and completions; a streamed plain answer
carries no logprobs, so a stream asking for them is a 400); auto answers one choice (n = 1) and refuses tools
(it measures a text answer).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from refine_server.policies.answer_extraction import extract_answer, question_options
from refine_server.policies.auto.calibration import Calibrations, FirstCall
from refine_server.policies.auto.params import AutoLimits, AutoParams
from refine_server.policies.auto.signals import (
    CONFIDENCE_K,
    SURE_WHEN_HIGH,
    Reading,
    SensorSource,
    Signal,
    api_tokens,
    is_sure,
    measure,
    tokens_of_span,
)
from refine_server.policies.base import (
    CORRECTIONS,
    ENGINE_CALLS,
    EXTRA_TOKENS,
    REWINDS,
    ROUNDS,
    SEARCH_ITERATIONS,
    Policy,
    PolicyCall,
    PolicyMetric,
    PolicyRequestError,
    ResolvedPolicy,
    Trace,
)
from refine_server.policies.cyberv.params import CyberVParams
from refine_server.policies.cyberv.policy import TOP_LOGPROBS, CyberVPolicy, sensor_source
from refine_server.policies.cyberv.question import direct_call, read_question
from refine_server.policies.cyberv.sensor import Generation
from refine_server.policies.relayed import ACCEPTED
from refine_server.policies.response_bodies import AnswerShapes, split_for_streaming

ESCALATED_HEADER = "x-refine-escalated"
DECISIONS = PolicyMetric(
    "refine_auto_decisions",
    "Requests auto answered, by the policy it escalates to, the signal it read and whether it escalated",
    "counter",
    labels=("escalation", "signal", "escalated"),
)


@dataclass(frozen=True)
class FirstAnswer:
    """The first call's answer and what it measured."""

    response: dict[str, Any]  # the plain answer, as the client would receive it
    text: str
    reading: Reading
    generation: Generation | None  # CyberV's candidate 0, where the escalation can take it
    calls: int  # engine calls outside the request's spend (a relayed first call)


class AutoRun:
    """One request: the first answer, the decision, maybe the escalation, and the trace of all of it."""

    def __init__(self, call: PolicyCall, params: AutoParams, calibrations: Calibrations):
        assert call.nested is not None, "the server resolves `escalate` before the policy runs"
        call.request.require_one_choice("auto", "returns one answer")
        self.call = call
        self.params = params
        self.escalation: ResolvedPolicy = call.nested
        self.cyberv = isinstance(self.escalation.policy, CyberVPolicy)
        self.first_call: FirstCall = "cyberv_direct" if self.cyberv else "request"
        if params.threshold is not None:
            self.threshold, self.threshold_source = params.threshold, "request"
        else:
            self.threshold, self.threshold_source = calibrations.threshold(
                call.request.model, self.first_call, params.signal
            )
        self.first: FirstAnswer | None = None
        self.signals: dict[Signal, float] = {}
        self.escalated = False
        self.busy = False  # unsure, but the escalation policy's concurrency limit left no slot in time
        self.inner = PolicyCall(call.request, call.engine)  # the escalation's own call: its trace is its own
        self.relays = 0  # relayed engine calls (not in the engine client's spend)

    # -- the first answer and the decision --

    async def decide(self) -> bool:
        """Make the first call, measure it, decide; True when escalating."""
        first = self.first = await (self._cyberv_direct() if self.cyberv else self._request_as_sent())
        self.relays += first.calls
        options = question_options(_question_text(self.call))
        answer = extract_answer(first.text, options=options) if first.text else None
        span = tokens_of_span(first.text, first.reading.nbytes, answer.start, answer.end) if answer else None
        self.signals = measure(first.reading, span, self.params.window)
        self.escalated = not is_sure(self.params.signal, self.signals[self.params.signal], self.threshold)
        if self.escalated and self.call.enter_nested is not None and not await self.call.enter_nested():
            self.escalated, self.busy = False, True
        self.call.trace.headers[ESCALATED_HEADER] = self.decision
        return self.escalated

    @property
    def decision(self) -> str:
        """true, false, or busy: unsure, but no slot of the escalation policy freed in time."""
        return "busy" if self.busy else "true" if self.escalated else "false"

    async def _cyberv_direct(self) -> FirstAnswer:
        params = self.escalation.params
        assert isinstance(params, CyberVParams)
        if params.decode is not None:
            raise PolicyRequestError(
                "auto reuses CyberV's plain direct answer; a CyberV decoded with SRGen makes another one",
                "refine.escalate.decode",
            )
        engine = self.call.engine
        messages, fields = direct_call(read_question(self.call.request), params)
        source = await sensor_source(engine, params)
        if source == "engine":
            result, stats = await engine.chat_with_token_stats(
                "round1", messages, logprobs=True, top_logprobs=0, **fields
            )
            choice = result["choices"][0]
            reading = Reading.from_engine(stats[0], api_tokens(choice))
            generation = Generation.from_choice(choice, stats[0])
        else:
            result = await engine.chat("round1", messages, logprobs=True, top_logprobs=CONFIDENCE_K, **fields)
            choice = result["choices"][0]
            reading = Reading.from_api(api_tokens(choice))
            generation = Generation.from_choice(_with_top(choice, TOP_LOGPROBS))
        shapes = AnswerShapes(self.call.request.endpoint, self.call.request.model)
        response = shapes.response(generation.text, generation.finish_reason, engine.usage())
        return FirstAnswer(response, generation.text, reading, generation, calls=0)

    async def _request_as_sent(self) -> FirstAnswer:
        engine = self.call.engine
        body = self.call.request.body
        source: SensorSource = "engine" if await engine.token_stats_unavailable() is None else "top_logprobs"
        chat = self.call.request.endpoint == "chat"
        wanted = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
        top = wanted if source == "engine" else max(wanted, CONFIDENCE_K)
        sent = {**body, **({"logprobs": True, "top_logprobs": top} if chat else {"logprobs": top})}
        if source == "engine":
            result, stats = await engine.relay_with_token_stats(sent)
            choice = result["choices"][0]
            reading = Reading.from_engine(stats[0], api_tokens(choice))
        else:
            result = await engine.relay(sent)
            choice = result["choices"][0]
            reading = Reading.from_api(api_tokens(choice))
        _as_asked(result, body, chat, wanted)
        text = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
        return FirstAnswer(result, text, reading, None, calls=1)

    @property
    def answer(self) -> FirstAnswer:
        assert self.first is not None, "decide() runs first"
        return self.first

    # -- the escalation --

    async def escalate(self) -> dict[str, Any]:
        policy, params = self.escalation.policy, self.escalation.params
        if self.cyberv:
            assert isinstance(policy, CyberVPolicy) and isinstance(params, CyberVParams)
            return await policy.complete(self.inner, params, direct=self.answer.generation)
        self.relays += policy.relays_request
        result = await policy.complete(self.inner, params)
        _add_usage(result, self.answer.response.get("usage"))
        return result

    async def escalate_stream(self) -> AsyncGenerator[dict[str, Any], None]:
        """The escalation's stream; a relayed one's events decoded (refine may translate them into another
        API's events, which it does from chunks), the first call's usage added to its usage."""
        policy, params = self.escalation.policy, self.escalation.params
        chunks: AsyncGenerator[dict[str, Any] | bytes, None]
        if self.cyberv:
            assert isinstance(policy, CyberVPolicy) and isinstance(params, CyberVParams)
            chunks = policy.stream(self.inner, params, direct=self.answer.generation)
        else:
            self.relays += policy.relays_request
            chunks = policy.stream(self.inner, params)
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                if isinstance(chunk, bytes):
                    if chunk == ACCEPTED:
                        continue
                    chunk = msgspec.json.decode(chunk)
                if not self.cyberv:
                    _add_usage(chunk, self.answer.response.get("usage"))
                # Before each chunk leaves: refine attaches the trace to the one that finishes the answer.
                self.fill_trace()
                yield chunk

    # -- the trace --

    def fill_trace(self) -> None:
        p, first, trace = self.params, self.answer, self.call.trace
        inner: Trace = self.inner.trace
        trace.data = {
            "signal": p.signal,
            "value": _rounded(self.signals[p.signal]),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "sure_when": ">=" if SURE_WHEN_HIGH[p.signal] else "<=",
            "escalated": self.escalated,
            "escalation_busy": self.busy,
            "escalate": self.escalation.policy.name,
            "first_call": self.first_call,
            "sensor_source": first.reading.source,
            "first_answer_tokens": len(first.reading.nbytes),
            "signals": {name: _rounded(value) for name, value in self.signals.items()},
            "first_answer_reused": self.escalated and self.cyberv,
            "escalation": inner.data if self.escalated else None,
        }
        if self.escalated:
            trace.values.update(inner.values)
            trace.headers.update(inner.headers)
        trace.record(ENGINE_CALLS, self.call.engine.spend.engine_calls + self.relays)
        trace.record(DECISIONS, 1, self.escalation.policy.name, p.signal, self.decision)


class AutoPolicy(Policy[AutoParams]):
    name = "auto"
    Params = AutoParams
    Limits = AutoLimits
    # Its own decision, and what the policies it escalates to report (observed under `auto`).
    metrics = (*Policy.metrics, DECISIONS, CORRECTIONS, ROUNDS, EXTRA_TOKENS, SEARCH_ITERATIONS, REWINDS, ENGINE_CALLS)
    refuses_fields = ("tools", "tool_choice")

    def __init__(self, calibration_file: Path | None = None):
        self.calibrations = Calibrations.load(calibration_file)

    def nested_policy(self, params: AutoParams) -> tuple[str, str, dict[str, Any]]:
        return "escalate", params.escalate.policy, params.escalate.params()

    async def complete(self, call: PolicyCall, params: AutoParams) -> dict[str, Any]:
        run = AutoRun(call, params, self.calibrations)
        if not await run.decide():
            run.fill_trace()
            return run.answer.response
        result = await run.escalate()
        run.fill_trace()
        return result

    async def stream(self, call: PolicyCall, params: AutoParams) -> AsyncGenerator[dict[str, Any], None]:
        for field in ("logprobs", "top_logprobs"):
            if call.request.asks_for(field):
                raise PolicyRequestError(f"auto streams a plain answer without {field}: send it unstreamed", field)
        run = AutoRun(call, params, self.calibrations)
        escalated = await run.decide()
        run.fill_trace()
        if params.progress:
            yield _progress(run)
        if not escalated:
            for chunk in _answer_chunks(run):
                yield chunk
            return
        async with aclosing(run.escalate_stream()) as chunks:
            async for chunk in chunks:
                yield chunk


def _progress(run: AutoRun) -> dict[str, Any]:
    shapes = AnswerShapes(run.call.request.endpoint, run.call.request.model)
    data = run.call.trace.data
    decided = {k: data[k] for k in ("signal", "value", "threshold", "escalated", "escalate")}
    return shapes.chunk([], refine_progress={"stage": "decided", **decided})


def _answer_chunks(run: AutoRun) -> list[dict[str, Any]]:
    """The plain answer as a stream: its text in pieces of a few words, the finishing chunk, the usage."""
    response = run.answer.response
    choice = response["choices"][0]
    shapes = AnswerShapes(run.call.request.endpoint, run.call.request.model, id=response.get("id") or "")
    chunks = [shapes.piece(piece, first=i == 0) for i, piece in enumerate(split_for_streaming(run.answer.text))]
    chunks.append(shapes.finish(choice.get("finish_reason")))
    if run.call.request.include_usage:
        chunks.append(shapes.chunk([], usage=response.get("usage")))
    return chunks


def _question_text(call: PolicyCall) -> str:
    """The question's text, for reading a multiple-choice answer's options ("" when there is none)."""
    request = call.request
    if request.endpoint != "chat":
        return request.prompt if isinstance(request.prompt, str) else ""
    content = ((request.messages or [{}])[-1]).get("content")
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _with_top(choice: dict[str, Any], k: int) -> dict[str, Any]:
    """A chat choice whose tokens show only their top k alternatives."""
    logprobs = choice.get("logprobs") or {}
    content = [{**item, "top_logprobs": (item.get("top_logprobs") or [])[:k]} for item in logprobs.get("content") or ()]
    return {**choice, "logprobs": {**logprobs, "content": content}}


def _as_asked(result: dict[str, Any], body: dict[str, Any], chat: bool, wanted: int) -> None:
    """Take off what the measurement added to the client's answer: logprobs it did not ask for, alternatives
    beyond the number it asked for, the token ids the sensor needed."""
    asked = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
    if not body.get("return_token_ids"):
        result.pop("prompt_token_ids", None)
    for choice in result.get("choices") or ():
        if not body.get("return_token_ids"):
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        logprobs = choice.get("logprobs")
        if not asked or logprobs is None:
            choice["logprobs"] = None
        elif chat:
            for item in logprobs.get("content") or ():
                item["top_logprobs"] = (item.get("top_logprobs") or [])[:wanted]
        else:
            logprobs["top_logprobs"] = [
                dict(sorted((alts or {}).items(), key=lambda kv: -kv[1])[:wanted])
                for alts in logprobs.get("top_logprobs") or ()
            ]


def _add_usage(response: dict[str, Any], first: dict[str, Any] | None) -> None:
    """Count the first call's tokens in an escalated answer's usage (where it has one)."""
    usage = response.get("usage")
    if not first or not isinstance(usage, dict):
        return
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        usage[key] = (usage.get(key) or 0) + (first.get(key) or 0)


def _rounded(value: float) -> float | None:
    return None if value != value else round(value, 4)  # NaN: not measured
