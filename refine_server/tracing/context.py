"""The W3C trace context that goes to vLLM with each engine call, and the names refine's spans share.

The backend reads `outgoing_headers()` for every call: None while tracing is off (the variable is only ever set
by a span), so an untraced call costs one context-variable read.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

# The W3C trace context the backend sends with the engine call being made now (`traceparent`): the engine
# call's span inside one, else the request's span. Set only while tracing is on, so None when off.
OUTGOING: ContextVar[dict[str, str] | None] = ContextVar("refine_trace_headers", default=None)

# GenAI semantic conventions' operation names, by refine's endpoint.
OPERATIONS = {"chat": "chat", "completions": "text_completion", "responses": "chat", "messages": "chat"}


def outgoing_headers() -> dict[str, str] | None:
    """Headers for the backend's next call (`traceparent`, `tracestate`); None when tracing is off."""
    return OUTGOING.get()


def trace_headers(context: Any) -> dict[str, str]:
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier
