"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/completions.

A generation request goes: parse and check the body -> pick the policy from its `refine` object (or the
server default) -> let the policy answer through the backend -> add the `refine` block -> count it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from refine_server.auth import Grant
from refine_server.disconnect import ClientDisconnected, cancel_on_disconnect
from refine_server.engine_fields import check_engine_fields
from refine_server.errors import APIError, from_validation_error, invalid_request
from refine_server.policies import LimitExceeded, Policy, PolicyParams, UnknownPolicy
from refine_server.policies.base import Endpoint, PolicyCall
from refine_server.schemas import ChatCompletionRequest, CompletionRequest
from refine_server.streaming import SSE_HEADERS, ChunkRelay

if TYPE_CHECKING:
    from refine_server.app import Runtime

router = APIRouter()

_REQUEST_MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _grant(request: Request) -> Grant:
    """FastAPI dependency: the caller's API key checked, and what it may do."""
    return _runtime(request).keys.authenticate(request)


@router.get("/v1/models", dependencies=[Depends(_grant)])
async def list_models(request: Request) -> dict[str, Any]:
    return await _runtime(request).backend.get_json("/v1/models")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, grant: Grant = Depends(_grant)) -> Response:
    return await _generate(request, "chat", grant)


@router.post("/v1/completions")
async def completions(request: Request, grant: Grant = Depends(_grant)) -> Response:
    return await _generate(request, "completions", grant)


async def _generate(request: Request, endpoint: Endpoint, grant: Grant) -> Response:
    started = time.perf_counter()
    rt = _runtime(request)
    policy_label = "other"

    def record(status: int) -> None:
        rt.metrics.requests.labels(endpoint, policy_label, str(status)).inc()
        rt.metrics.e2e_latency.labels(endpoint, policy_label).observe(time.perf_counter() - started)

    try:
        body, parsed = await _parse_body(request, endpoint, rt.settings.max_tokens_limit)
        check_engine_fields(body, rt.open_engine_fields)
        policy, params = _choose_policy(rt, parsed.refine, grant)
        policy_label = rt.metrics.policy_label(policy.name)
        if policy.needs_engine_plugin:
            await _require_engine_plugin(rt, policy, parsed.model)
        call = PolicyCall(endpoint, body, rt.backend)

        def refine_block() -> dict[str, Any]:
            rt.metrics.correction_time.labels(policy_label).observe(call.trace.correction_seconds)
            trace = call.trace
            if trace.corrections is not None:
                rt.metrics.corrections.labels(policy_label).observe(trace.corrections)
            if trace.rounds is not None:
                rt.metrics.rounds.labels(policy_label).observe(trace.rounds)
            if trace.extra_tokens is not None:
                rt.metrics.extra_tokens.labels(policy_label).inc(trace.extra_tokens)
            for histogram, count in ((rt.metrics.search_iterations, trace.search_iterations),
                                     (rt.metrics.rewinds, trace.rewinds),
                                     (rt.metrics.engine_calls, trace.engine_calls)):
                if count is not None:
                    histogram.labels(policy_label).observe(count)
            return {"policy": policy.name, "params": params.model_dump(mode="json"), "trace": call.trace.data}

        if parsed.stream:
            chunks = policy.stream(call, params)
            # Wait for the first chunk before answering, so a backend that refuses the request yields a real
            # HTTP error status instead of a 200 stream that carries an error.
            try:
                first = await cancel_on_disconnect(request, anext(chunks, None))
            except BaseException:
                await chunks.aclose()
                raise
            relay = ChunkRelay(
                first, chunks, n_choices=parsed.n or 1, refine_block=refine_block, metrics=rt.metrics,
                policy_label=policy_label, started=started, on_finish=record,
            )
            return StreamingResponse(relay, media_type="text/event-stream", headers=SSE_HEADERS)

        result = await cancel_on_disconnect(request, policy.complete(call, params))
        result["refine"] = refine_block()
        record(200)
        return JSONResponse(result)
    except APIError as exc:
        record(exc.status)
        raise
    except ClientDisconnected:
        record(499)
        return Response(status_code=499)


async def _parse_body(request: Request, endpoint: Endpoint, max_tokens_limit: int):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise invalid_request("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object")
    try:
        parsed = _REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    wanted = parsed.requested_max_tokens()
    if wanted is not None and wanted > max_tokens_limit:
        param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        raise invalid_request(f"{param}={wanted} exceeds this server's limit of {max_tokens_limit}", param)
    body.pop("refine", None)
    return body, parsed


def _choose_policy(rt: Runtime, spec, grant: Grant) -> tuple[Policy, PolicyParams]:
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


async def _require_engine_plugin(rt: Runtime, policy: Policy, model: str) -> None:
    """A 400 for an in-engine policy on a backend whose plugin cannot run it for this proxy."""
    plugin = await rt.backend.plugin(model)
    where = f"the backend at {rt.backend.base_url}"
    if plugin is None:
        problem = (f"{where} does not have refine's engine plugin: pip install refine-server into the vLLM "
                   "environment and restart it")
    elif policy.name not in plugin.handshake.policies:
        problem = f"{where} has refine's engine plugin {plugin.handshake.version}, which does not offer it"
    elif plugin.handshake.signature != "ok":
        problem = (f"{where} has refine's engine plugin but {'no' if plugin.handshake.signature == 'no secret' else 'another'} "
                   "engine secret: set the same REFINE_ENGINE_SECRET for refine and in vLLM's environment")
    else:
        return
    raise APIError(400, f"policy {policy.name!r} runs inside vLLM, but {problem}", param="refine.policy",
                   code="engine_plugin_missing")
