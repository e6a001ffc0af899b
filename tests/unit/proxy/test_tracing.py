"""OpenTelemetry tracing: a span per request with GenAI attributes, a child span per engine call, vLLM given
the W3C traceparent, corrections as events; off by default, and then no spans and no header."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest
from openai import OpenAI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.base import CORRECTIONS, PolicyCall, PolicyParams
from refine_server.policies.engine_client import run_together
from refine_server.policies.none import NonePolicy
from refine_server.tracing import Tracing, otlp_endpoint, traces_url
from tests.fake_vllm import MODEL, make_app, serve_in_thread
from tests.unit.proxy.helpers import BrokenPolicy

_OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "REFINE_OTEL_ENDPOINT",
)


class MultiCallPolicy(NonePolicy):
    """Four engine calls, by purpose, as CyberV and RAIN make them: one, two at once, then one more;
    streaming: one call, then a streamed one."""

    name = "multi"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        await call.engine.completions("draft", "draft it", max_tokens=3)
        await run_together(*(call.engine.completions("verify", f"check {i}", max_tokens=2, n=2) for i in range(2)))
        result = await call.engine.completions("final", "final answer", max_tokens=4)
        result["usage"] = call.engine.usage()
        return result

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any]]:
        await call.engine.completions("draft", "draft it", max_tokens=3)
        async for chunk in call.engine.stream_completions("answer", [1, 2, 3], max_tokens=3):
            yield chunk


class CorrectingPolicy(NonePolicy):
    """Lists its corrections in its trace as SRGen does (`trace.data["corrections"]`)."""

    name = "correcting"
    metrics = (*NonePolicy.metrics, CORRECTIONS)

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        result = await super().complete(call, params)
        call.trace.data = {
            "num_corrections": 2,
            "corrections": [
                {
                    "sequence": 0,
                    "position": 7,
                    "entropy": 2.5,
                    "threshold": 1.9,
                    "token_before": 11,
                    "token_after": 12,
                    "seconds": 0.01,
                },
                {
                    "sequence": 0,
                    "position": 9,
                    "entropy": 2.2,
                    "threshold": 1.9,
                    "token_before": 13,
                    "token_after": 14,
                    "seconds": 0.02,
                },
            ],
        }
        call.trace.record(CORRECTIONS, 2)
        return result


def _registry() -> PolicyRegistry:
    return PolicyRegistry([NonePolicy, MultiCallPolicy, CorrectingPolicy, BrokenPolicy])


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(make_app()) as url:
        yield url


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(upstream: str, exporter: InMemorySpanExporter) -> Iterator[str]:
    with serve_in_thread(create_app(Settings(backend_url=[upstream]), _registry(), span_exporter=exporter)) as url:
        yield url


@pytest.fixture()
def spans(exporter: InMemorySpanExporter, traced: str) -> InMemorySpanExporter:
    """The traced refine's exporter, emptied for one test."""
    exporter.clear()
    return exporter


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _finished(exporter: InMemorySpanExporter, count: int, timeout_s: float = 5.0) -> list[ReadableSpan]:
    """The spans, once `count` have ended (a stream's request span ends just after its last byte)."""
    deadline = time.monotonic() + timeout_s
    while len(found := exporter.get_finished_spans()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(found)


def _traceparents(upstream: str) -> list[str | None]:
    return httpx.get(f"{upstream}/fake/traceparents").json()


def _traceparent_of(span: ReadableSpan) -> str:
    """The W3C traceparent naming `span`, less its flags byte (sampled; the SDK may add random-trace-id)."""
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}"


def _request_span(spans: list[ReadableSpan]) -> ReadableSpan:
    (span,) = [s for s in spans if s.kind == SpanKind.SERVER]
    return span


def test_a_request_is_a_span_with_genai_attributes(traced: str, spans: InMemorySpanExporter, upstream: str) -> None:
    before = len(_traceparents(upstream))
    resp = _client(traced).completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0.5, seed=3)
    assert resp.choices[0].text == "alpha beta gamma"

    found = _finished(spans, 2)
    request = _request_span(found)
    assert request.name == f"text_completion {MODEL}"
    attrs = dict(request.attributes or {})
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.request.max_tokens"] == 5
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.request.seed"] == 3
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == 1 and attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["refine.policy"] == "none"
    assert attrs["http.response.status_code"] == 200
    assert attrs["refine.upstream"] == upstream
    assert request.status.status_code != StatusCode.ERROR

    # `none`'s one engine call, the relay: a child span, whose context vLLM received.
    (relay,) = [s for s in found if s.kind == SpanKind.CLIENT]
    assert relay.name == "relay" and relay.parent.span_id == request.context.span_id
    assert relay.attributes["gen_ai.usage.output_tokens"] == 3
    (sent,) = _traceparents(upstream)[before:]
    assert sent.rsplit("-", 1)[0] == _traceparent_of(relay) and int(sent[-2:], 16) & 1  # sampled


def test_each_engine_call_is_a_child_span_named_by_purpose(
    traced: str, spans: InMemorySpanExporter, upstream: str
) -> None:
    before = len(_traceparents(upstream))
    _client(traced).completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "multi"}})

    found = _finished(spans, 5)
    request = _request_span(found)
    calls = sorted((s for s in found if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [s.name for s in calls] == ["draft", "verify", "verify", "final"]
    assert all(s.parent.span_id == request.context.span_id for s in calls)
    assert all(s.context.trace_id == request.context.trace_id for s in calls)
    verify = calls[1].attributes
    assert verify["refine.engine.purpose"] == "verify" and verify["gen_ai.request.choice.count"] == 2
    assert verify["gen_ai.request.max_tokens"] == 2 and verify["gen_ai.usage.output_tokens"] == 3
    assert request.attributes["refine.engine.calls"] == 4
    assert request.attributes["gen_ai.usage.output_tokens"] == 12  # the whole request's usage, as answered

    # Every engine call carried its own span's context to vLLM.
    sent = {t.rsplit("-", 1)[0] for t in _traceparents(upstream)[before:]}
    assert sent == {_traceparent_of(s) for s in calls}


def test_a_stream_span_ends_with_the_stream(traced: str, spans: InMemorySpanExporter) -> None:
    stream = _client(traced).completions.create(
        model=MODEL, prompt="hi", stream=True, extra_body={"refine": {"policy": "multi"}}
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == "alpha beta gamma"

    found = _finished(spans, 3)
    request = _request_span(found)
    assert [s.name for s in sorted(found, key=lambda s: s.start_time or 0) if s.kind == SpanKind.CLIENT] == [
        "draft",
        "answer",
    ]
    assert request.attributes["refine.stream"] is True
    assert request.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert request.attributes["http.response.status_code"] == 200
    assert request.end_time is not None


def test_corrections_in_the_trace_become_span_events(traced: str, spans: InMemorySpanExporter) -> None:
    _client(traced).completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "correcting"}})
    request = _request_span(_finished(spans, 2))
    events = [e for e in request.events if e.name == "refine.correction"]
    assert [e.attributes["position"] for e in events] == [7, 9]
    assert events[0].attributes["entropy"] == 2.5 and events[0].attributes["token_after"] == 12
    assert request.attributes["refine.refine_corrections_per_request"] == 2


def test_the_clients_trace_context_is_the_parent(traced: str, spans: InMemorySpanExporter) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    httpx.post(
        f"{traced}/v1/completions",
        json={"model": MODEL, "prompt": "hi"},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    ).raise_for_status()
    request = _request_span(_finished(spans, 2))
    assert f"{request.context.trace_id:032x}" == trace_id
    assert f"{request.parent.span_id:016x}" == parent_id


def test_failures_are_recorded_on_the_span(traced: str, spans: InMemorySpanExporter) -> None:
    resp = httpx.post(f"{traced}/v1/completions", json={"model": MODEL, "prompt": "FAIL_500"})
    assert resp.status_code == 502
    found = _finished(spans, 2)
    request = _request_span(found)
    assert request.attributes["http.response.status_code"] == 502
    assert request.attributes["error.type"] == "502"
    assert request.status.status_code == StatusCode.ERROR
    (relay,) = [s for s in found if s.kind == SpanKind.CLIENT]
    assert relay.status.status_code == StatusCode.ERROR and relay.attributes["error.type"] == "502"

    spans.clear()
    resp = httpx.post(f"{traced}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": "x"})
    assert resp.status_code == 400
    request = _request_span(_finished(spans, 1))
    assert request.attributes["http.response.status_code"] == 400
    assert request.status.status_code != StatusCode.ERROR  # a client's mistake is not the server's error


def test_tracing_off_sends_no_traceparent_and_makes_no_spans(upstream: str, exporter: InMemorySpanExporter) -> None:
    with mock.patch.dict(os.environ, {}, clear=False) as env:
        for name in _OTEL_VARS:
            env.pop(name, None)
        settings = Settings(backend_url=[upstream])
        assert Tracing.start(settings) is None
        app = create_app(settings, _registry())
        with serve_in_thread(app) as url:
            exporter.clear()
            before = len(_traceparents(upstream))
            client = _client(url)
            client.completions.create(model=MODEL, prompt="hi")
            client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "multi"}})
            "".join(
                c.choices[0].text for c in client.completions.create(model=MODEL, prompt="hi", stream=True) if c.choices
            )
            assert app.state.tracing is None
            assert _traceparents(upstream)[before:] == [None] * 6
            assert exporter.get_finished_spans() == ()


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys; from refine_server.app import create_app; from refine_server.config import Settings; "
        "create_app(Settings(backend_url=['http://127.0.0.1:9'])); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {k: v for k, v in os.environ.items() if k not in _OTEL_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_endpoint_settings() -> None:
    with mock.patch.dict(os.environ, {}, clear=False) as env:
        for name in _OTEL_VARS:
            env.pop(name, None)
        assert otlp_endpoint(Settings()) is None
        assert otlp_endpoint(Settings(otel_endpoint="http://collector:4318")) == "http://collector:4318/v1/traces"
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel:4318"
        assert otlp_endpoint(Settings()) == "http://otel:4318"
        env["REFINE_OTEL_ENDPOINT"] = "http://mine:4318/v1/traces/"
        assert otlp_endpoint(Settings()) == "http://mine:4318/v1/traces"
        env["OTEL_SDK_DISABLED"] = "true"
        assert otlp_endpoint(Settings()) is None
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"


def test_spans_reach_an_otlp_collector(upstream: str) -> None:
    """The real exporter, OTLP/HTTP protobuf, into a stand-in collector; flushed when refine stops."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    received: list[bytes] = []

    async def traces(request: Request) -> Response:
        received.append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    collector = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
    with serve_in_thread(collector) as collector_url:
        with serve_in_thread(
            create_app(
                Settings(backend_url=[upstream], otel_endpoint=collector_url, otel_service_name="refine-test"),
                _registry(),
            )
        ) as url:
            _client(url).completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "multi"}})
        # refine's lifespan has ended: its provider flushed the batch.
        names, services = [], set()
        for body in received:
            export = ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                services |= {
                    a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
                }
                names += [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert sorted(names) == sorted([f"text_completion {MODEL}", "draft", "verify", "verify", "final"])
    assert services == {"refine-test"}
