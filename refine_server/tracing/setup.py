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

Off, nothing here is imported from OpenTelemetry, the app holds `None` instead of a `Tracing`, a request's
`EngineClient` gets the policies' no-op tracer, and the backend reads one context variable that stays None.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from refine_server.tracing.request_span import RequestSpan

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from refine_server.config import Settings


def otlp_endpoint(settings: Settings) -> str | None:
    """Where spans go: refine's own setting, else the standard OpenTelemetry variables; None: tracing off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otel_endpoint:
        return traces_url(settings.otel_endpoint)
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


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
            raise RuntimeError(
                "tracing is configured but OpenTelemetry is not installed: pip install "
                "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
            ) from exc
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
