"""How clients find refine's API without reading the README: the request bodies in /openapi.json (OpenAI's
fields plus `refine`, one schema per policy) and GET /v1/refine/policies (each policy's parameters, defaults
and this server's caps).

The models here only describe. Requests are still read by `schemas.py`'s models, which check only what refine
itself needs (vLLM checks the rest), so documenting costs the hot path nothing; and since the generation
endpoints are plain Starlette routes, FastAPI never reads their bodies and its own 422 never answers: every
error stays OpenAI's (`errors.py`).
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema
from pydantic_core import to_jsonable_python

from refine_server.auth import Grant
from refine_server.policies import Policy, PolicyRegistry
from refine_server.policies.request import PATHS, Endpoint
from refine_server.runtime import Runtime, get_grant, get_runtime
from refine_server.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter()

REFINE_DESCRIPTION = (
    "refine's extension: the self-correction policy for this request and its parameters. Without it the "
    "server's default policy applies (GET /v1/refine/policies names it). Parameters are checked against the "
    "policy's schema and this server's caps: a bad one is a 400 naming the field (`refine.<param>`)."
)


# ---- the request bodies ----------------------------------------------------------------------------------

class ChatMessage(BaseModel):
    """One message of the conversation, as OpenAI's API takes it (vLLM checks the details)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments, as a JSON schema")
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str] = Field(description='{"name": the function to call}')


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SharedFields(BaseModel):
    """OpenAI's fields that refine passes to vLLM without reading them."""

    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class _ChatDoc(_SharedFields, ChatCompletionRequest):
    """OpenAI's chat completion request. Fields not listed here are vLLM's own and pass through to it."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, description="policies that write their own answer refuse it (400)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = Field(
        None, description="policies that write their own answer refuse it (400)")


class _CompletionDoc(_SharedFields, CompletionRequest):
    """OpenAI's (legacy) completion request. Fields not listed here are vLLM's own and pass through to it."""

    suffix: str | None = None


def policy_description(policy: Policy) -> str:
    """The policy class's docstring, or else its module's: the first paragraph, on one line."""
    cls = type(policy)
    doc = cls.__dict__.get("__doc__") or inspect.getdoc(sys.modules[cls.__module__]) or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def refine_models(registry: PolicyRegistry) -> list[type[BaseModel]]:
    """One schema per policy: `policy` (its name) and the policy's own parameters."""
    return [
        create_model(
            f"Refine_{name}", __base__=policy.Params, __doc__=policy_description(policy),
            policy=(Literal[name], Field(description="the policy's name")),
        )
        for name, policy in ((name, registry.get(name)) for name in registry.names)
    ]


def request_models(registry: PolicyRegistry) -> tuple[type[BaseModel], type[BaseModel]]:
    """The chat and completions request bodies, with `refine` as one of the registered policies' schemas."""
    variants = refine_models(registry)
    refine: Any = variants[0] if len(variants) == 1 else Annotated[Union[tuple(variants)],
                                                                   Field(discriminator="policy")]
    field = (refine | None, Field(None, description=REFINE_DESCRIPTION))
    return (create_model("ChatCompletionRequest", __base__=_ChatDoc, refine=field),
            create_model("CompletionRequest", __base__=_CompletionDoc, refine=field))


# ---- the responses ---------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's format."""

    error: ErrorDetail


class RefineBlock(BaseModel):
    """What the policy did: on the response, or on the stream's chunk that finishes the last choice."""

    policy: str
    params: dict[str, Any] = Field(description="the parameters in effect, defaults included")
    trace: dict[str, Any] = Field(description="the policy's own account of its work")


class GenerationResponse(BaseModel):
    """OpenAI's response object (chat.completion or text_completion), plus `refine`."""

    model_config = ConfigDict(extra="allow")

    refine: RefineBlock


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
        "description": "the answer; with `stream: true`, server-sent events of chunks, ended by `data: [DONE]`",
        "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in _SUMMARY_HEADERS.items()},
        "content": {"application/json": {"schema": response_ref}, "text/event-stream": {"schema": {"type": "string"}}},
    }
    errors = {status: {"description": text, "content": {"application/json": {"schema": error_ref}}}
              for status, text in _ERRORS.items()}
    return {"200": ok, **errors}


# The generation endpoints are plain Starlette routes (openai_api.py), which FastAPI leaves out of its schema,
# so their operations are written here, under the operation ids of OpenAI's own API description: a client
# generated from either names them alike.
_OPERATIONS: dict[Endpoint, tuple[str, str]] = {
    "chat": ("createChatCompletion", "A chat completion, under the policy the request's `refine` names"),
    "completions": ("createCompletion", "A (legacy) text completion, under the policy the request's `refine` names"),
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
    chat, completion = request_models(registry)
    keys = [(chat, "validation"), (completion, "validation"), (ErrorResponse, "serialization"),
            (GenerationResponse, "serialization")]
    refs, defs = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    responses = _responses(refs[(ErrorResponse, "serialization")], refs[(GenerationResponse, "serialization")])
    paths = {}
    for endpoint, model in (("chat", chat), ("completions", completion)):
        operation_id, summary = _OPERATIONS[endpoint]
        body = {"required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
        paths[PATHS[endpoint]] = {"post": {"operationId": operation_id, "summary": summary, "requestBody": body,
                                           "responses": responses}}
    return paths


# ---- GET /v1/refine/policies -----------------------------------------------------------------------------

class PolicyInfo(BaseModel):
    name: str
    description: str
    runs_in_engine: bool = Field(description="needs refine's plugin in vLLM (refused on a backend without it)")
    refuses_fields: list[str] = Field(description="request fields the policy cannot honour: a request with one "
                                      "is a 400 naming it")
    params_schema: dict[str, Any] = Field(description="the JSON schema of the policy's `refine` parameters")
    defaults: dict[str, Any] = Field(description="the value each parameter takes when the request leaves it out")
    limits: dict[str, int | float] = Field(description="this server's caps on parameters, for this caller "
                                     "(the server's, tightened by the API key's own)")
    metrics: list[str] = Field(description="the Prometheus metrics the policy reports, labelled policy=<name>")
    warm: bool = Field(description="what the policy needs (models, tokenizers) is loaded: its first request "
                       "does not wait for it")
    warm_up: str = Field(description="warm, pending (waiting for a backend), warming, failed: <why> (then it "
                         "loads on first use), or off: loads on first use (--warm-up false)")
    admission: dict[str, int | float | None] = Field(
        description="concurrency_limit (null: unlimited), running and waiting requests now (this worker "
        "process), queue_timeout_s, engine_priority (lower is scheduled first; null: none is sent)")


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    default_policy: str = Field(description="the policy a request without `refine` gets")
    data: list[PolicyInfo]


@router.get("/v1/refine/policies", response_model=PolicyList)
async def list_policies(rt: Runtime = Depends(get_runtime), grant: Grant = Depends(get_grant)) -> PolicyList:
    """The policies this caller may use, with their parameters' schemas, defaults and this server's caps."""
    names = [n for n in rt.registry.names if grant.policies is None or n in grant.policies]
    return PolicyList(default_policy=rt.settings.default_policy,
                      data=[_describe(rt, name, grant) for name in names])


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
        defaults={f: to_jsonable_python(info.get_default(call_default_factory=True))
                  for f, info in fields.items() if not info.is_required()},
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
