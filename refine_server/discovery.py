"""How clients find refine's API without reading the README: the request bodies in /openapi.json (OpenAI's
fields plus `refine`, one schema per policy) and GET /v1/refine/policies (each policy's parameters, defaults
and this server's caps).

The request and response bodies are `schemas.py`'s, the models that read every request: here they are only
written out, with `refine` narrowed to the registered policies' schemas. Since the generation endpoints are
plain Starlette routes, FastAPI never reads their bodies and its own 422 never answers: every error stays
OpenAI's (`errors.py`).
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, create_model
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from pydantic_core import to_jsonable_python

from refine_server.auth import Grant
from refine_server.policies import Policy, PolicyRegistry
from refine_server.policies.request import PATHS, Endpoint
from refine_server.runtime import Runtime, get_grant, get_runtime
from refine_server.schemas import (
    REQUEST_MODELS,
    AnthropicErrorResponse,
    ErrorResponse,
    GenerationResponse,
    PolicyInfo,
    PolicyList,
)

router = APIRouter()

REFINE_DESCRIPTION = (
    "refine's extension: the self-correction policy for this request and its parameters. Without it the "
    "server's default policy applies (GET /v1/refine/policies names it). Parameters are checked against the "
    "policy's schema and this server's caps: a bad one is a 400 naming the field (`refine.<param>`)."
)


# ---- the request bodies ----------------------------------------------------------------------------------


def policy_description(policy: Policy[Any]) -> str:
    """The policy class's docstring, or else its module's: the first paragraph, on one line."""
    cls = type(policy)
    doc = cls.__dict__.get("__doc__") or inspect.getdoc(sys.modules[cls.__module__]) or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def refine_models(registry: PolicyRegistry) -> list[type[BaseModel]]:
    """One schema per policy: `policy` (its name) and the policy's own parameters."""
    return [_refine_model(name, registry.get(name)) for name in registry.names]


def _refine_model(name: str, policy: Policy[Any]) -> type[BaseModel]:
    name_type: Any = Literal[name]  # a type made at run time, which mypy cannot follow
    return create_model(
        f"Refine_{name}",
        __base__=policy.Params,
        __doc__=policy_description(policy),
        policy=(name_type, Field(description="the policy's name")),
    )


def request_models(registry: PolicyRegistry) -> dict[Endpoint, type[BaseModel]]:
    """Each generation endpoint's request body, with `refine` as one of the registered policies' schemas."""
    variants = refine_models(registry)
    # Union[...] of a tuple made at run time, which `|` cannot spell.
    refine: Any = (
        variants[0]
        if len(variants) == 1
        else Annotated[
            Union[tuple(variants)],  # noqa: UP007
            Field(discriminator="policy"),
        ]
    )
    field = (refine | None, Field(None, description=REFINE_DESCRIPTION))
    return {
        endpoint: create_model(model.__name__, __base__=model, refine=field)
        for endpoint, model in REQUEST_MODELS.items()
    }


# ---- the responses ---------------------------------------------------------------------------------------

_SUMMARY_HEADERS = {
    "x-refine-policy": "the policy that answered (streaming responses too)",
    "x-refine-corrections": "corrections the policy made, where it counts them (not streaming)",
    "x-refine-rounds": "rounds of generation, where the policy counts them (not streaming)",
    "x-refine-engine-calls": "generation calls to vLLM, where the policy counts them (not streaming)",
    "x-refine-search-iterations": "search iterations, where the policy searches (not streaming)",
}
_ERRORS = {
    "400": "a malformed request, a bad or over-limit parameter, or a field the policy cannot honour",
    "401": "a missing or wrong API key",
    "403": "a policy this API key may not use",
    "404": "a model the backend does not serve",
    "502": "the backend failed",
    "503": "no backend is ready, or the policy cannot run now",
    "504": "the backend did not answer in time",
}


def _responses(error_ref: dict[str, str], response_ref: dict[str, str]) -> dict[str, Any]:
    ok = {
        "description": "the answer; with `stream: true`, server-sent events: chat and completions send chunks "
        "ended by `data: [DONE]`, the Responses and Messages APIs their own named events",
        "headers": {
            name: {"description": text, "schema": {"type": "string"}} for name, text in _SUMMARY_HEADERS.items()
        },
        "content": {"application/json": {"schema": response_ref}, "text/event-stream": {"schema": {"type": "string"}}},
    }
    errors = {
        status: {"description": text, "content": {"application/json": {"schema": error_ref}}}
        for status, text in _ERRORS.items()
    }
    return {"200": ok, **errors}


# The generation endpoints are plain Starlette routes (openai_api.py), which FastAPI leaves out of its schema,
# so their operations are written here, under the operation ids of OpenAI's own API description: a client
# generated from either names them alike.
_OPERATIONS: dict[Endpoint, tuple[str, str]] = {
    "chat": ("createChatCompletion", "A chat completion, under the policy the request's `refine` names"),
    "completions": ("createCompletion", "A (legacy) text completion, under the policy the request's `refine` names"),
    "responses": (
        "createResponse",
        "A response (OpenAI's Responses API), under the policy the request's `refine` names",
    ),
    "messages": (
        "createMessage",
        "A message (Anthropic's Messages API), under the policy the request's `refine` "
        "names; errors in Anthropic's format",
    ),
}


def install_openapi(app: FastAPI, registry: PolicyRegistry) -> None:
    """/openapi.json: FastAPI's schema of its own routes, plus the generation endpoints' operations with their
    request bodies (one `refine` schema per policy) and responses; built on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema["paths"] = {**_generation_operations(schema, registry), **schema.get("paths", {})}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _generation_operations(schema: dict[str, Any], registry: PolicyRegistry) -> dict[str, Any]:
    """The paths of the generation endpoints; their models' schemas go into the schema's components."""
    requests = request_models(registry)
    keys: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in requests.values()),
        (ErrorResponse, "serialization"),
        (AnthropicErrorResponse, "serialization"),
        (GenerationResponse, "serialization"),
    ]
    refs, defs = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    answer = refs[(GenerationResponse, "serialization")]
    paths = {}
    for endpoint, model in requests.items():
        error = AnthropicErrorResponse if endpoint == "messages" else ErrorResponse
        operation_id, summary = _OPERATIONS[endpoint]
        body = {"required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
        paths[PATHS[endpoint]] = {
            "post": {
                "operationId": operation_id,
                "summary": summary,
                "requestBody": body,
                "responses": _responses(refs[(error, "serialization")], answer),
            }
        }
    return paths


# ---- GET /v1/refine/policies -----------------------------------------------------------------------------


@router.get("/v1/refine/policies", response_model=PolicyList)
async def list_policies(rt: Runtime = Depends(get_runtime), grant: Grant = Depends(get_grant)) -> PolicyList:
    """The policies this caller may use, with their parameters' schemas, defaults and this server's caps."""
    names = [n for n in rt.registry.names if grant.policies is None or n in grant.policies]
    return PolicyList(default_policy=rt.settings.default_policy, data=[_describe(rt, name, grant) for name in names])


def _describe(rt: Runtime, name: str, grant: Grant) -> PolicyInfo:
    registry = rt.registry
    policy = registry.get(name)
    fields = policy.Params.model_fields
    return PolicyInfo(
        name=name,
        description=policy_description(policy),
        runs_in_engine=policy.needs_engine_plugin,
        refuses_fields=list(policy.refuses_fields),
        params_schema=policy.Params.model_json_schema(),
        defaults={
            f: to_jsonable_python(info.get_default(call_default_factory=True))
            for f, info in fields.items()
            if not info.is_required()
        },
        limits=_caps(registry, name, grant),
        metrics=[m.name for m in policy.metrics],
        warm=rt.warm_up.is_warm(name),
        warm_up=rt.warm_up.state[name],
        admission=rt.gatekeeper.describe(name, grant),
    )


def _caps(registry: PolicyRegistry, name: str, grant: Grant) -> dict[str, int | float]:
    caps: dict[str, int | float] = {}
    own = grant.limits.get(name)
    for limits in (registry.limits(name), *([own] if own else [])):
        for param, cap in limits:
            if cap is not None:
                caps[param] = min(cap, caps.get(param, cap))
    return caps
