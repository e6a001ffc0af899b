"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/completions.

Each generation route authenticates, opens the request's span when tracing is on, and hands the request to a
`GenerationServing` (serving.py), which reads it, chooses the policy, checks, answers and records.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from refine_server.policies.request import PATHS, Endpoint
from refine_server.runtime import Runtime, get_grant, get_runtime, runtime_of
from refine_server.serving import GenerationServing

router = APIRouter()

@router.get("/v1/models", dependencies=[Depends(get_grant)])
async def list_models(rt: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    return await rt.upstreams.best().backend.get_json("/v1/models")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completions")


# The generation endpoints are plain Starlette routes, not FastAPI's: they read and check their own body
# (schemas.py) and find the runtime and the caller's key themselves, so FastAPI's work per request (solving
# dependencies, parsing parameters, an exit stack) would only delay the first token (bench/proxy.py).
# discovery.py writes their OpenAPI operations.
router.add_route(PATHS["chat"], chat_completions, methods=["POST"])
router.add_route(PATHS["completions"], completions, methods=["POST"])


async def _generate(request: Request, endpoint: Endpoint) -> Response:
    rt = runtime_of(request)
    grant = rt.keys.authenticate(request)  # as get_grant: a 401 before anything is counted or traced
    tracing = request.app.state.tracing
    if tracing is None:  # tracing off: nothing more than this test
        return await GenerationServing(request, endpoint, rt, grant, None).respond()
    span = tracing.request_span(endpoint, request.url.path, request.headers)
    with span.active():
        return await GenerationServing(request, endpoint, rt, grant, span).respond()
