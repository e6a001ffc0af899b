"""OpenTelemetry traces of refine's requests, off unless an OTLP endpoint is configured.

On (`--otel-endpoint URL` / `REFINE_OTEL_ENDPOINT`, or the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
`OTEL_EXPORTER_OTLP_ENDPOINT`), each worker process sets up its own tracer provider in the app's lifespan and
exports over OTLP/HTTP (protobuf). Every generation request is a SERVER span named as OpenTelemetry's GenAI
conventions name it (`chat {model}`, `text_completion {model}`), child of the client's `traceparent` when it
sent one; every engine call a policy makes through its `EngineClient` is a CLIENT span under it, named by the
call's purpose (CyberV's `round1`, RAIN's `expand`, `relay` for a request passed through), and the backend
sends vLLM that span's W3C `traceparent`, so a vLLM started with `--otlp-traces-endpoint` hangs its own spans
below. Corrections a policy lists in its trace (`trace.data["corrections"]`, SRGen's) become events on the
request span.

Off, nothing here is imported from OpenTelemetry, the app holds `None` instead of a `Tracing`, the route and
`EngineClient` test one attribute for None, and the backend reads one context variable that stays None.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from refine_server.config import Settings
    from refine_server.policies.base import PolicyCall
    from refine_server.policies.request import ClientRequest

T = TypeVar("T")

# The W3C trace context the backend sends with the engine call being made now (`traceparent`): the engine
# call's span inside one, else the request's span. Set only while tracing is on, so None when off.
_OUTGOING: ContextVar[dict[str, str] | None] = ContextVar("refine_trace_headers", default=None)

# GenAI semantic conventions' operation names, by refine's endpoint.
OPERATIONS = {"chat": "chat", "completions": "text_completion"}
_SCALARS = (str, bool, int, float)


def outgoing_headers() -> dict[str, str] | None:
    """Headers for the backend's next call (`traceparent`, `tracestate`); None when tracing is off."""
    return _OUTGOING.get()


def otlp_endpoint(settings: Settings) -> str | None:
    """Where spans go: refine's own setting, else the standard OpenTelemetry variables; None: tracing off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otel_endpoint:
        return traces_url(settings.otel_endpoint)
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def traces_url(endpoint: str) -> str:
    """A collector's base URL (http://collector:4318) or its full traces URL, as the traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """One process's tracer provider and tracer (each `--workers` process has its own)."""

    def __init__(self, provider: TracerProvider):
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("refine_server")

    @classmethod
    def start(cls, settings: Settings, exporter: SpanExporter | None = None) -> Tracing | None:
        """The provider for this process, or None when tracing is off. `exporter`: export there instead of over
        OTLP, span by span (tests use the SDK's InMemorySpanExporter)."""
        endpoint = otlp_endpoint(settings)
        if exporter is None and endpoint is None:
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as exc:
            raise RuntimeError("tracing is configured but OpenTelemetry is not installed: pip install "
                               "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http") from exc
        attributes = {"service.instance.id": uuid.uuid4().hex}  # one per worker process
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = settings.otel_service_name
        # The sampler is the SDK's default (parent-based, always on), or OTEL_TRACES_SAMPLER's.
        provider = TracerProvider(resource=Resource.create(attributes))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # From the standard variables when refine's setting is unset (they may carry headers and a timeout).
            otlp = OTLPSpanExporter(endpoint=endpoint) if settings.otel_endpoint else OTLPSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(otlp))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop (blocks up to the exporter's timeout: call it off the event loop)."""
        self.provider.shutdown()

    def request_span(self, endpoint: str, path: str, headers: Mapping[str, str]) -> RequestSpan:
        return RequestSpan(self.tracer, endpoint, path, headers)


class RequestSpan:
    """The span of one generation request, and the hook its `EngineClient` calls around each engine call."""

    def __init__(self, tracer: Tracer, endpoint: str, path: str, headers: Mapping[str, str]):
        from opentelemetry import propagate, trace

        self._tracer = tracer
        self._operation = OPERATIONS[endpoint]
        self.span: Span = tracer.start_span(
            self._operation, context=propagate.extract(headers), kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": self._operation, "http.request.method": "POST", "url.path": path},
        )
        self._context = trace.set_span_in_context(self.span)
        self._headers = _trace_headers(self._context)
        self._input_tokens = 0  # over every engine call, for a response that reports no usage (a stream)
        self._output_tokens = 0
        self._calls = 0
        self._finish_reasons: dict[int, str] = {}  # a stream's, by choice index
        self._stream_usage: dict[str, Any] | None = None
        self.policy_call: PolicyCall | None = None  # the policy's, once it runs (the last one, after a failover)

    # ---- the request -------------------------------------------------------------------------------------

    @contextmanager
    def active(self) -> Iterator[None]:
        """Engine calls made in here send the request span's trace context (those with spans of their own,
        theirs). Entered and left in one task, around the route's work."""
        token = _OUTGOING.set(self._headers)
        try:
            yield
        finally:
            _OUTGOING.reset(token)

    def started(self, request: ClientRequest, policy: str) -> None:
        span = self.span
        span.update_name(f"{self._operation} {request.model}")
        body = request.body
        attributes: dict[str, Any] = {"gen_ai.request.model": request.model, "refine.policy": policy,
                                      "refine.stream": request.stream}
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

    def watch_stream(self, chunks: AsyncIterator[dict[str, Any] | bytes]
                     ) -> AsyncIterator[dict[str, Any] | bytes]:
        """A policy's chunks as they go to the client, read for finish reasons and usage; each step taken with
        the request's trace context current (the policy's engine calls run in it)."""
        return self._watch(chunks)

    async def _watch(self, chunks: AsyncIterator[dict[str, Any] | bytes]) -> AsyncIterator[dict[str, Any] | bytes]:
        async with aclosing(chunks):  # type: ignore[type-var]
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
            chunk = msgspec.json.decode(chunk)
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finish_reasons[choice.get("index") or 0] = str(choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            self._stream_usage = chunk["usage"]

    def finished(self, status: int) -> None:
        """The request is over with this HTTP status (499: the client went away): the span ends."""
        span = self.span
        if self._finish_reasons:
            self._set_response([self._finish_reasons[i] for i in sorted(self._finish_reasons)],
                               self._stream_usage, None, None)
        elif self._stream_usage is not None:
            self._set_response([], self._stream_usage, None, None)
        if not span.is_recording():
            span.end()
            return
        attributes: dict[str, Any] = {"http.response.status_code": status, "refine.engine.calls": self._calls}
        if "gen_ai.usage.input_tokens" not in getattr(span, "attributes", {}) and self._calls:
            attributes["gen_ai.usage.input_tokens"] = self._input_tokens
            attributes["gen_ai.usage.output_tokens"] = self._output_tokens
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
            for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                              ("completion_tokens", "gen_ai.usage.output_tokens")):
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
                    span.add_event("refine.correction", {k: v for k, v in correction.items()
                                                         if isinstance(v, _SCALARS)})

    # ---- the EngineClient's hook: one span per engine call -------------------------------------------------

    async def call(self, purpose: str, endpoint: str, body: dict[str, Any],
                   send: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """One non-streaming engine call, `send()`, in a span of its own."""
        span, headers = self._start_call(purpose, endpoint, body)
        token = _OUTGOING.set(headers)
        try:
            result = await send()
        except BaseException as exc:
            _failed(span, exc)
            span.end()
            raise
        finally:
            _OUTGOING.reset(token)
        self._count(span, result.get("usage"))
        span.end()
        return result

    def stream(self, purpose: str, endpoint: str, body: dict[str, Any],
               chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        """One streaming engine call, `chunks` (decoded or the engine's JSON bytes), in a span of its own that
        ends with the stream."""
        return self._stream(purpose, endpoint, body, chunks)

    async def _stream(self, purpose: str, endpoint: str, body: dict[str, Any],
                      chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        span, headers = self._start_call(purpose, endpoint, body)
        usage: dict[str, Any] | None = None
        try:
            async with aclosing(chunks):  # type: ignore[type-var]
                # The request goes out on the first step: set and reset in that one step, which runs in one task.
                token = _OUTGOING.set(headers)
                try:
                    chunk = await anext(chunks, None)
                finally:
                    _OUTGOING.reset(token)
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

        self._calls += 1
        attributes: dict[str, Any] = {
            "refine.engine.purpose": purpose, "gen_ai.operation.name": OPERATIONS.get(endpoint, endpoint),
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
        span = self._tracer.start_span(purpose, context=self._context, kind=trace.SpanKind.CLIENT,
                                       attributes=attributes)
        return span, _trace_headers(trace.set_span_in_context(span))

    def _count(self, span: Span, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self._input_tokens += prompt
            span.set_attribute("gen_ai.usage.input_tokens", prompt)
        if isinstance(completion, int):
            self._output_tokens += completion
            span.set_attribute("gen_ai.usage.output_tokens", completion)


def _trace_headers(context: Any) -> dict[str, str]:
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def _failed(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    status = getattr(exc, "status", None)
    span.set_attribute("error.type", str(status) if status is not None else type(exc).__name__)
    if not isinstance(exc, Exception):  # cancelled: the client went away, or a sibling call failed
        span.set_attribute("refine.engine.cancelled", True)
    else:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
