"""The endpoints: /v1/models, and generation in three APIs: OpenAI's /v1/chat/completions, /v1/completions and
/v1/responses, and Anthropic's /v1/messages.

Each generation route authenticates, opens the request's span when tracing is on, and hands the request to a
`GenerationServing` (serving.py), which reads it, chooses the policy, checks, answers and records.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from refine_server.errors import APIError
from refine_server.front_ends import FRONT_ENDS, FrontEnd
from refine_server.policies.request import PATHS, Endpoint
from refine_server.runtime import Runtime, get_grant, get_runtime, runtime_of
from refine_server.serving import GenerationServing

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(get_grant)])
async def list_models(rt: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    return await rt.upstreams.best().backend.get_json("/v1/models")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, FRONT_ENDS["chat"])


async def completions(request: Request) -> Response:
    return await _generate(request, FRONT_ENDS["completions"])


async def responses(request: Request) -> Response:
    return await _generate(request, FRONT_ENDS["responses"])


async def messages(request: Request) -> Response:
    return await _generate(request, FRONT_ENDS["messages"])


# The generation endpoints are plain Starlette routes, not FastAPI's: they read and check their own body
# (schemas.py) and find the runtime and the caller's key themselves, so FastAPI's work per request (solving
# dependencies, parsing parameters, an exit stack) would only delay the first token (bench/proxy.py).
# discovery.py writes their OpenAPI operations.
_ROUTES: dict[Endpoint, Callable[[Request], Awaitable[Response]]] = {
    "chat": chat_completions,
    "completions": completions,
    "responses": responses,
    "messages": messages,
}
for _endpoint, _route in _ROUTES.items():
    router.add_route(PATHS[_endpoint], _route, methods=["POST"])


async def _generate(request: Request, front: FrontEnd) -> Response:
    rt = runtime_of(request)
    try:
        grant = rt.keys.authenticate(request)  # as get_grant: a 401 before anything is counted or traced
    except APIError as exc:
        return front.error_response(exc)
    tracing = request.app.state.tracing
    if tracing is None:  # tracing off: nothing more than this test
        return await GenerationServing(request, front, rt, grant, None).respond()
    span = tracing.request_span(front.endpoint, request.url.path, request.headers)
    with span.active():
        return await GenerationServing(request, front, rt, grant, span).respond()
