"""refine's wire types: the models that read a request's body and the same models that document it.

The generation requests are typed as far as refine relies on them and as OpenAI documents them; every field
not listed passes through untouched (`extra="allow"`), so whatever the official openai client or vLLM's own
extensions send reaches vLLM as sent, and vLLM checks the rest. Types are strict: `"n": "2"` is an error, as it
is for OpenAI. /openapi.json (discovery.py) is written from these very classes, with `refine` narrowed to one
schema per registered policy, so what is documented is what is checked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from refine_server.policies.request import ClientRequest, Endpoint


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# ---- the requests ----------------------------------------------------------------------------------------


class RefineSpec(_Open):
    """The `refine` object: a policy name and that policy's parameters (validated by the policy)."""

    policy: str | None = None

    def policy_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatMessage(_Open):
    """One message of the conversation, as OpenAI's API takes it (vLLM checks the details)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="the arguments, as a JSON schema")
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, str] = Field(description='{"name": the function to call}')


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


class _GenerationRequest(_Open):
    """The fields both generation endpoints share; OpenAI's, and `refine`."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    refine: RefineSpec | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def client_request(self, endpoint: Endpoint, body: dict[str, Any]) -> ClientRequest:
        """What policies receive: this request typed, with `body` (the client's, `refine` removed) to forward."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return ClientRequest(
            endpoint=endpoint,
            body=body,
            model=self.model,
            n=self.n or 1,
            max_tokens=self.requested_max_tokens(),
            seed=self.seed,
            stop=stop,
            stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            messages=body.get("messages") if endpoint == "chat" else None,
            prompt=body.get("prompt") if endpoint == "completions" else None,
        )


class ChatCompletionRequest(_GenerationRequest):
    """OpenAI's chat completion request. Fields not listed here are vLLM's own and pass through to it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, description="policies that write their own answer refuse it (400)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = Field(
        None, description="policies that write their own answer refuse it (400)"
    )

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    """OpenAI's (legacy) completion request. Fields not listed here are vLLM's own and pass through to it."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None


class ResponsesRequest(_Open):
    """OpenAI's Responses API request (`client.responses.create`). Fields not listed here pass through to vLLM
    with `none` and `srgen`; policies that write their own answer read text only and refuse the rest (400)."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(description="the conversation: a text, or a list of input items")
    instructions: str | None = Field(None, description="a system message placed before the input")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    refine: RefineSpec | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens


class AnthropicMessage(_Open):
    """One turn of a Messages API conversation: a text, or content blocks (vLLM checks the blocks)."""

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Open):
    """Anthropic's Messages API request (`client.messages.create`). Fields not listed here pass through to
    vLLM with `none` and `srgen`; policies that write their own answer read text only and refuse the rest."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    refine: RefineSpec | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


GenerationRequest = _GenerationRequest | ResponsesRequest | MessagesRequest
REQUEST_MODELS: dict[Endpoint, type[GenerationRequest]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "responses": ResponsesRequest,
    "messages": MessagesRequest,
}


# ---- the responses ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's format (but for the Messages API's)."""

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """The Messages API's errors, in Anthropic's format."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


class RefineBlock(BaseModel):
    """What the policy did: on the response, or on the stream's chunk that finishes the last choice."""

    policy: str
    params: dict[str, Any] = Field(description="the parameters in effect, defaults included")
    trace: dict[str, Any] = Field(description="the policy's own account of its work")
    server_defaults: dict[str, Any] | None = Field(
        None, description='what the server filled in that the request left out: {"max_tokens": N}'
    )


class GenerationResponse(BaseModel):
    """The API's own answer object (chat.completion, text_completion, response or message), plus `refine`."""

    model_config = ConfigDict(extra="allow")

    refine: RefineBlock


# ---- GET /v1/refine/policies -----------------------------------------------------------------------------


class PolicyInfo(BaseModel):
    name: str
    description: str
    runs_in_engine: bool = Field(description="needs refine's plugin in vLLM (refused on a backend without it)")
    refuses_fields: list[str] = Field(
        description="request fields the policy cannot honour: a request with one is a 400 naming it"
    )
    params_schema: dict[str, Any] = Field(description="the JSON schema of the policy's `refine` parameters")
    defaults: dict[str, Any] = Field(description="the value each parameter takes when the request leaves it out")
    limits: dict[str, int | float] = Field(
        description="this server's caps on parameters, for this caller (the server's, tightened by the API key's own)"
    )
    metrics: list[str] = Field(description="the Prometheus metrics the policy reports, labelled policy=<name>")
    warm: bool = Field(
        description="what the policy needs (models, tokenizers) is loaded: its first request does not wait for it"
    )
    warm_up: str = Field(
        description="warm, pending (waiting for a backend), warming, failed: <why> (then it "
        "loads on first use), or off: loads on first use (--warm-up false)"
    )
    admission: dict[str, int | float | None] = Field(
        description="concurrency_limit (null: unlimited), running and waiting requests now (this worker "
        "process), queue_timeout_s, engine_priority (lower is scheduled first; null: none is sent)"
    )


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    default_policy: str = Field(description="the policy a request without `refine` gets")
    data: list[PolicyInfo]
