"""The span of one generation request (SERVER): the request's attributes, the response's, the policy's trace."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING, Any

import msgspec

from refine_server.tracing.context import OPERATIONS, OUTGOING, trace_headers
from refine_server.tracing.engine_calls import EngineCallSpans

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from refine_server.policies.base import PolicyCall
    from refine_server.policies.request import ClientRequest

_SCALARS = (str, bool, int, float)


class RequestSpan:
    """The span of one generation request. Its `engine_calls` is the `CallTracer` the request's `EngineClient`
    gets: a child span per engine call."""

    def __init__(self, tracer: Tracer, endpoint: str, path: str, headers: Mapping[str, str]):
        from opentelemetry import propagate, trace

        self._operation = OPERATIONS[endpoint]
        self.span: Span = tracer.start_span(
            self._operation,
            context=propagate.extract(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": self._operation, "http.request.method": "POST", "url.path": path},
        )
        context = trace.set_span_in_context(self.span)
        self._headers = trace_headers(context)
        self.engine_calls = EngineCallSpans(tracer, context)
        self._finish_reasons: dict[int, str] = {}  # a stream's, by choice index
        self._stream_usage: dict[str, Any] | None = None
        self.policy_call: PolicyCall | None = None  # the policy's, once it runs (the last one, after a failover)

    # ---- the request -------------------------------------------------------------------------------------

    @contextmanager
    def active(self) -> Iterator[None]:
        """Engine calls made in here send the request span's trace context (those with spans of their own,
        theirs). Entered and left in one task, around the route's work."""
        token = OUTGOING.set(self._headers)
        try:
            yield
        finally:
            OUTGOING.reset(token)

    def started(self, request: ClientRequest, policy: str) -> None:
        span = self.span
        span.update_name(f"{self._operation} {request.model}")
        body = request.body
        attributes: dict[str, Any] = {
            "gen_ai.request.model": request.model,
            "refine.policy": policy,
            "refine.stream": request.stream,
        }
        if request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        for field, name in (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p")):
            value = body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[name] = value
        if request.seed is not None:
            attributes["gen_ai.request.seed"] = request.seed
        if request.n != 1:
            attributes["gen_ai.request.choice.count"] = request.n
        span.set_attributes(attributes)

    def routed(self, upstream: str) -> None:
        self.span.set_attribute("refine.upstream", upstream)

    def answered(self, result: dict[str, Any]) -> None:
        """A non-streaming response: its finish reasons, usage, id and model."""
        reasons = [str(c.get("finish_reason")) for c in result.get("choices") or () if isinstance(c, dict)]
        self._set_response(reasons, result.get("usage"), result.get("id"), result.get("model"))

    def watch_stream(
        self, chunks: AsyncGenerator[dict[str, Any] | bytes, None]
    ) -> AsyncGenerator[dict[str, Any] | bytes, None]:
        """A policy's chunks as they go to the client, read for finish reasons and usage; each step taken with
        the request's trace context current (the policy's engine calls run in it)."""
        return self._watch(chunks)

    async def _watch(
        self, chunks: AsyncGenerator[dict[str, Any] | bytes, None]
    ) -> AsyncGenerator[dict[str, Any] | bytes, None]:
        async with aclosing(chunks):
            while True:
                with self.active():
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                self._read_chunk(chunk)
                yield chunk

    def _read_chunk(self, chunk: dict[str, Any] | bytes) -> None:
        if isinstance(chunk, bytes):
            # The engine's own JSON, relayed: decoded only when it may finish a choice or carry usage.
            if b'"finish_reason":"' not in chunk and b'"usage":{' not in chunk:
                return
            body: dict[str, Any] = msgspec.json.decode(chunk)
        else:
            body = chunk
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finish_reasons[choice.get("index") or 0] = str(choice["finish_reason"])
        if isinstance(body.get("usage"), dict):
            self._stream_usage = body["usage"]

    def finished(self, status: int) -> None:
        """The request is over with this HTTP status (499: the client went away): the span ends."""
        span = self.span
        if self._finish_reasons:
            self._set_response(
                [self._finish_reasons[i] for i in sorted(self._finish_reasons)], self._stream_usage, None, None
            )
        elif self._stream_usage is not None:
            self._set_response([], self._stream_usage, None, None)
        if not span.is_recording():
            span.end()
            return
        calls = self.engine_calls
        attributes: dict[str, Any] = {"http.response.status_code": status, "refine.engine.calls": calls.calls}
        if "gen_ai.usage.input_tokens" not in getattr(span, "attributes", {}) and calls.calls:
            attributes["gen_ai.usage.input_tokens"] = calls.input_tokens
            attributes["gen_ai.usage.output_tokens"] = calls.output_tokens
        if self.policy_call is not None:
            self._add_trace(self.policy_call)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            attributes["error.type"] = str(status)
            span.set_status(Status(StatusCode.ERROR))
        elif status >= 400:
            attributes["error.type"] = str(status)
        span.set_attributes(attributes)
        span.end()

    def _set_response(self, reasons: list[str], usage: Any, response_id: Any, model: Any) -> None:
        attributes: dict[str, Any] = {}
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
        if isinstance(usage, dict):
            for key, name in (
                ("prompt_tokens", "gen_ai.usage.input_tokens"),
                ("completion_tokens", "gen_ai.usage.output_tokens"),
            ):
                if isinstance(usage.get(key), int):
                    attributes[name] = usage[key]
        if isinstance(response_id, str):
            attributes["gen_ai.response.id"] = response_id
        if isinstance(model, str):
            attributes["gen_ai.response.model"] = model
        self.span.set_attributes(attributes)

    def _add_trace(self, call: PolicyCall) -> None:
        """The policy's metric values as attributes, and the corrections it lists as events."""
        span = self.span
        span.set_attributes({f"refine.{name}": value for name, value in call.trace.values.items()})
        corrections = call.trace.data.get("corrections") if isinstance(call.trace.data, dict) else None
        if isinstance(corrections, list):
            for correction in corrections:
                if isinstance(correction, dict):
                    span.add_event(
                        "refine.correction", {k: v for k, v in correction.items() if isinstance(v, _SCALARS)}
                    )
