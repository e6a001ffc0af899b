"""A CLIENT span for each engine call a policy makes: refine's `CallTracer` (policies/transport.py) when tracing
is on. Each span's trace context goes to vLLM with its call, so vLLM's own spans hang below it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from refine_server.tracing.context import OPERATIONS, OUTGOING, trace_headers

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

T = TypeVar("T")


class EngineCallSpans:
    """Opens a span per engine call under the request's span, and counts the calls and their tokens."""

    def __init__(self, tracer: Tracer, parent: Context):
        self._tracer = tracer
        self._parent = parent
        self.calls = 0
        self.input_tokens = 0  # over every engine call, for a response that reports no usage (a stream)
        self.output_tokens = 0

    async def call(
        self, purpose: str, endpoint: str, body: dict[str, Any], send: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """One non-streaming engine call, `send()`, in a span of its own."""
        span, headers = self._start_call(purpose, endpoint, body)
        token = OUTGOING.set(headers)
        try:
            result = await send()
        except BaseException as exc:
            _failed(span, exc)
            span.end()
            raise
        finally:
            OUTGOING.reset(token)
        self._count(span, result.get("usage"))
        span.end()
        return result

    def stream(
        self, purpose: str, endpoint: str, body: dict[str, Any], chunks: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        """One streaming engine call, `chunks` (decoded or the engine's JSON bytes), in a span of its own that
        ends with the stream."""
        return self._stream(purpose, endpoint, body, chunks)

    async def _stream(
        self, purpose: str, endpoint: str, body: dict[str, Any], chunks: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        span, headers = self._start_call(purpose, endpoint, body)
        usage: dict[str, Any] | None = None
        try:
            async with aclosing(chunks):
                # The request goes out on the first step: set and reset in that one step, which runs in one task.
                token = OUTGOING.set(headers)
                try:
                    chunk = await anext(chunks, None)
                finally:
                    OUTGOING.reset(token)
                while chunk is not None:
                    if isinstance(chunk, bytes):
                        if b'"usage":{' in chunk:
                            usage = msgspec.json.decode(chunk).get("usage") or usage
                    elif isinstance(chunk, dict):
                        usage = chunk.get("usage") or usage
                    yield chunk
                    chunk = await anext(chunks, None)
        except GeneratorExit:
            span.set_attribute("refine.engine.stopped_early", True)  # the caller had enough: vLLM aborts the rest
            raise
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            self._count(span, usage)
            span.end()

    def _start_call(self, purpose: str, endpoint: str, body: dict[str, Any]) -> tuple[Span, dict[str, str]]:
        from opentelemetry import trace

        self.calls += 1
        attributes: dict[str, Any] = {
            "refine.engine.purpose": purpose,
            "gen_ai.operation.name": OPERATIONS.get(endpoint, endpoint),
            "refine.engine.stream": bool(body.get("stream")),
        }
        if isinstance(body.get("model"), str):
            attributes["gen_ai.request.model"] = body["model"]
        n = body.get("n")
        attributes["gen_ai.request.choice.count"] = n if isinstance(n, int) else 1
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            attributes["refine.engine.prompts"] = len(prompt)
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(wanted, int):
            attributes["gen_ai.request.max_tokens"] = wanted
        span = self._tracer.start_span(purpose, context=self._parent, kind=trace.SpanKind.CLIENT, attributes=attributes)
        return span, trace_headers(trace.set_span_in_context(span))

    def _count(self, span: Span, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.input_tokens += prompt
            span.set_attribute("gen_ai.usage.input_tokens", prompt)
        if isinstance(completion, int):
            self.output_tokens += completion
            span.set_attribute("gen_ai.usage.output_tokens", completion)


def _failed(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    status = getattr(exc, "status", None)
    span.set_attribute("error.type", str(status) if status is not None else type(exc).__name__)
    if not isinstance(exc, Exception):  # cancelled: the client went away, or a sibling call failed
        span.set_attribute("refine.engine.cancelled", True)
    else:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
