"""A length bound on every generation: the client's max_tokens, or this server's default where it sets none.

vLLM's own default is the rest of the context: a chat request without max_tokens once generated 2,764 tokens
in 88 s on a server whose limit was 8. So a request that names neither max_tokens nor max_completion_tokens
is served with `Settings.answer_tokens_default()`, written into the body the engine receives and into the
typed request the policy reads; a policy's own engine calls without a length get it too (`CallFields`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from refine_server.policies.engine_client import LENGTH_FIELDS
from refine_server.policies.request import ClientRequest


def with_default_max_tokens(request: ClientRequest, default: int) -> ClientRequest:
    """`request`, or where it sets no length, the same request with `default` as its max_tokens."""
    if request.max_tokens is not None:
        return request
    body = {**request.body, LENGTH_FIELDS[request.endpoint]: default}
    return replace(request, body=body, max_tokens=default, max_tokens_defaulted=True)


def server_defaults(request: ClientRequest) -> dict[str, Any]:
    """What the response's `refine` block reports of the defaults the server applied: `{"server_defaults":
    {"max_tokens": N}}`, or nothing."""
    return {"server_defaults": {"max_tokens": request.max_tokens}} if request.max_tokens_defaulted else {}
