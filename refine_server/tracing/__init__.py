"""OpenTelemetry traces of refine's requests, off unless an OTLP endpoint is configured.

- `setup.py`: where spans go and each worker process's tracer provider (`Tracing`);
- `request_span.py`: the SERVER span of one generation request;
- `engine_calls.py`: a CLIENT span per engine call a policy makes (the policies' `CallTracer`);
- `context.py`: the W3C trace context the backend sends to vLLM with each call.
"""

from refine_server.tracing.context import outgoing_headers
from refine_server.tracing.request_span import RequestSpan
from refine_server.tracing.setup import Tracing, otlp_endpoint, traces_url

__all__ = ["RequestSpan", "Tracing", "otlp_endpoint", "outgoing_headers", "traces_url"]
