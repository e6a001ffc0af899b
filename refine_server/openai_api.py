"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/completions.

A generation request goes: parse and check the body -> pick the policy from its `refine` object (or the
server default) and refuse the fields it cannot honour -> let the policy answer through an `EngineClient` ->
add the `refine` block (and, not streaming, its summary headers), observe the policy's metrics -> count the
request. The route knows no policy's fields: a policy declares its metrics and fills them in its trace.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from refine_server.auth import Grant
from refine_server.backend import Backend
from refine_server.disconnect import ClientDisconnected, cancel_on_disconnect
from refine_server.engine_fields import check_engine_fields
from refine_server.errors import APIError, from_policy_error, from_validation_error, invalid_request
from refine_server.gatekeeper import Ticket
from refine_server.max_tokens import server_defaults, with_default_max_tokens
from refine_server.policies import LimitExceeded, Policy, PolicyError, PolicyParams, UnknownPolicy
from refine_server.policies.base import PolicyCall
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.request import PATHS, ClientRequest, Endpoint
from refine_server.runtime import Runtime, get_grant, get_runtime, runtime_of
from refine_server.schemas import ChatCompletionRequest, CompletionRequest, RefineSpec
from refine_server.streaming import SSE_HEADERS, Chunk, ChunkRelay, EventStreamResponse
from refine_server.tracing import RequestSpan
from refine_server.upstreams import Route

router = APIRouter()

POLICY_HEADER = "x-refine-policy"

_REQUEST_MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


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
        return await _serve(request, endpoint, rt, grant, None)
    span = tracing.request_span(endpoint, request.url.path, request.headers)
    with span.active():
        return await _serve(request, endpoint, rt, grant, span)


async def _serve(request: Request, endpoint: Endpoint, rt: Runtime, grant: Grant, span: RequestSpan | None) -> Response:
    started = time.perf_counter()
    policy_label = "other"
    route = Route(rt.upstreams)
    ticket: Ticket | None = None

    def record(status: int) -> None:
        route.finish()
        if ticket is not None:
            ticket.finish()
        rt.metrics.requests.labels(endpoint, policy_label, str(status)).inc()
        rt.metrics.e2e_latency.labels(endpoint, policy_label).observe(time.perf_counter() - started)
        if span is not None:
            span.finished(status)

    try:
        client_request, spec = await _read_request(request, endpoint, rt)
        policy, params = _choose_policy(rt, spec, grant)
        policy_label = rt.metrics.policy_label(policy.name)
        if span is not None:
            span.started(client_request, policy.name)
        _refuse_unhonoured_fields(policy, client_request)
        ticket = admitted = await rt.gatekeeper.admit(policy.name, grant, request.receive)
        # An in-engine policy goes only to a backend whose plugin can run it.
        suits = (lambda backend: _require_engine_plugin(policy, backend, client_request.model)
                 ) if policy.needs_engine_plugin else None

        def refine_block(call: PolicyCall) -> dict[str, Any]:
            rt.metrics.observe_policy(policy_label, call.trace.values)
            return {"policy": policy.name, "params": params.model_dump(mode="json"), "trace": call.trace.data,
                    **server_defaults(client_request)}

        if client_request.stream:
            calls: list[PolicyCall] = []  # one per replica tried: the last one answers

            async def open_stream(backend: Backend) -> tuple[Chunk | None, AsyncGenerator[Chunk, None]]:
                call = PolicyCall(client_request, _engine_client(backend, client_request, admitted, span))
                calls.append(call)
                chunks = policy.stream(call, params)
                if span is not None:
                    span.policy_call = call
                    chunks = span.watch_stream(chunks)
                try:
                    return await anext(chunks, None), chunks
                except BaseException:
                    await chunks.aclose()
                    raise

            async def reopen(failure: APIError) -> tuple[Chunk | None, AsyncGenerator[Chunk, None]]:
                route.leave(failure)
                return await route.run(open_stream, suits)

            # Answer once the stream is open: at the engine's 200 for a relayed stream (`relayed.ACCEPTED`), at
            # the first chunk for a policy that writes its own. A backend that refuses the request so yields a
            # real HTTP error status, and one that cannot be reached is replaced by another before the client
            # has seen anything (and, for a relayed stream, until its first event: `reopen`).
            first, chunks = await cancel_on_disconnect(request.receive, route.run(open_stream, suits))
            relay = ChunkRelay(
                first, chunks, n_choices=client_request.num_choices, refine_block=lambda: refine_block(calls[-1]),
                metrics=rt.metrics, policy_label=policy_label, started=started, on_finish=record, reopen=reopen,
            )
            # Headers go out before the policy's work is done: only the policy's name is known by then.
            return EventStreamResponse(relay.events(), headers={**SSE_HEADERS, POLICY_HEADER: policy.name})

        async def answer(backend: Backend) -> tuple[PolicyCall, dict[str, Any]]:
            call = PolicyCall(client_request, _engine_client(backend, client_request, admitted, span))
            if span is not None:
                span.policy_call = call
            return call, await cancel_on_disconnect(request.receive, policy.complete(call, params))

        call, result = await route.run(answer, suits)
        if span is not None:
            span.answered(result)
        result["refine"] = refine_block(call)
        record(200)
        return Response(msgspec.json.encode(result), media_type="application/json",
                        headers=_summary_headers(policy, call))
    except PolicyError as exc:
        record(exc.status)
        raise from_policy_error(exc) from None
    except APIError as exc:
        record(exc.status)
        raise
    except ClientDisconnected:
        record(499)
        return Response(status_code=499)
    except Exception:
        record(500)  # the app's handler answers with an OpenAI-style 500
        raise


def _engine_client(backend: Backend, request: ClientRequest, ticket: Ticket,
                   span: RequestSpan | None) -> EngineClient:
    engine = ticket.track(EngineClient(backend, request, fields=ticket.fields))
    if span is not None:
        engine.tracer = span  # a span per engine call
        span.routed(backend.base_url)
    return engine


async def _read_request(request: Request, endpoint: Endpoint, rt: Runtime) -> tuple[ClientRequest, RefineSpec | None]:
    """The typed request policies receive, and its `refine` object. A 400 for anything refine refuses."""
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw)
    except ValueError:
        raise invalid_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object")
    try:
        parsed = _REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    limit = rt.settings.max_tokens_limit
    wanted = parsed.requested_max_tokens()
    if wanted is not None and wanted > limit:
        param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        raise invalid_request(f"{param}={wanted} exceeds this server's limit of {limit}", param)
    check_engine_fields(body, rt.open_engine_fields)
    body.pop("refine", None)
    return with_default_max_tokens(parsed.client_request(endpoint, body), rt.settings.answer_tokens_default()), \
        parsed.refine


def _choose_policy(rt: Runtime, spec: RefineSpec | None, grant: Grant) -> tuple[Policy, PolicyParams]:
    name = (spec.policy if spec else None) or rt.settings.default_policy
    raw_params = spec.policy_params() if spec else {}
    if name in rt.registry.names:
        grant.check_policy(name)
    try:
        return rt.registry.resolve(name, raw_params, grant.limits)
    except UnknownPolicy:
        raise invalid_request(
            f"unknown policy {name!r}; this server offers: {', '.join(rt.registry.names)}", "refine.policy"
        ) from None
    except ValidationError as exc:
        raise from_validation_error(exc, prefix=("refine",)) from None
    except LimitExceeded as exc:
        raise invalid_request(str(exc), f"refine.{exc.param}") from None


def _refuse_unhonoured_fields(policy: Policy, request: ClientRequest) -> None:
    for field in policy.refuses_fields:
        if request.asks_for(field):
            raise APIError(400, f"policy {policy.name!r} cannot honour {field!r}: send the request without it, "
                           "or choose another policy", param=field, code="unsupported_parameter")


def _summary_headers(policy: Policy, call: PolicyCall) -> dict[str, str]:
    """The policy's name and the counts it recorded that have a header (corrections, rounds, ...)."""
    headers = {POLICY_HEADER: policy.name}
    for metric in policy.metrics:
        value = call.trace.values.get(metric.name)
        if metric.header and value is not None:
            headers[metric.header] = str(int(value)) if float(value).is_integer() else str(value)
    return headers


async def _require_engine_plugin(policy: Policy, backend: Backend, model: str) -> None:
    """A 400 for an in-engine policy on a backend whose plugin cannot run it for this proxy."""
    plugin = await backend.plugin(model)
    where = f"the backend at {backend.base_url}"
    if plugin is None:
        problem = (f"{where} does not have refine's engine plugin: pip install refine-server into the vLLM "
                   "environment and restart it")
    elif policy.name not in plugin.handshake.policies:
        problem = f"{where} has refine's engine plugin {plugin.handshake.version}, which does not offer it"
    elif plugin.handshake.signature != "ok":
        secret = "no" if plugin.handshake.signature == "no secret" else "another"
        problem = (f"{where} has refine's engine plugin but {secret} engine secret: set the same "
                   "REFINE_ENGINE_SECRET for refine and in vLLM's environment")
    else:
        return
    raise APIError(400, f"policy {policy.name!r} runs inside vLLM, but {problem}", param="refine.policy",
                   code="engine_plugin_missing")
