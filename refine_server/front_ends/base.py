"""A front end: one API's request and answer shapes, and how policies that write their own answer are served
through it.

Chat completions and completions are the policies' own shapes, so their front end changes nothing. The
Responses and Messages front ends (responses.py, messages.py) have two ways to serve a request:
- a relaying policy (`none`, SRGen) gets the body as the client sent it, `refine` removed, and forwards it to
  vLLM's endpoint of the same name: whatever vLLM supports there passes through, and its answer comes back as
  it was, `refine` added;
- a policy that writes its own answer (CyberV, RAIN) gets the request translated into a chat request
  (`translate`), and its chat answer or chunks are written back in the API's own shape (`answer`, `events`).
  What it cannot honour there (tools, images, stored conversations...) is refused with a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, ClassVar

from starlette.responses import JSONResponse, Response

from refine_server.errors import APIError
from refine_server.policies.request import ClientRequest, Endpoint
from refine_server.schemas import REQUEST_MODELS, GenerationRequest
from refine_server.streaming import Chunk


class FrontEnd:
    """The OpenAI chat and completions APIs: the policies' own shapes, nothing translated."""

    translates: ClassVar[bool] = False  # whether policies that write their own answer need `translate`

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.request_model: type[GenerationRequest] = REQUEST_MODELS[endpoint]

    def max_tokens_param(self, body: dict[str, Any]) -> str:
        """The field a client sets the length limit with, to name it in an error."""
        return "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"

    def relayed(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        """The request as a relaying policy forwards it (and, here, as every policy reads it)."""
        return parsed.client_request(self.endpoint, body)  # type: ignore[union-attr]

    def translate(self, parsed: GenerationRequest, body: dict[str, Any]) -> ClientRequest:
        """The request as a chat request, for a policy that writes its own answer."""
        return self.relayed(parsed, body)

    def answer(self, result: dict[str, Any], request: ClientRequest) -> dict[str, Any]:
        """A translated request's chat completion, written back in this API's shape."""
        return result

    def events(self, chunks: AsyncGenerator[Chunk, None], request: ClientRequest) -> AsyncGenerator[Chunk, None]:
        """A translated request's chat chunks, written back as this API's stream events."""
        return chunks

    def error_body(self, error: APIError) -> dict[str, Any]:
        return error.body()

    def error_response(self, error: APIError) -> Response:
        return JSONResponse(self.error_body(error), status_code=error.status, headers=error.headers)


def unsupported(param: str, why: str = "a policy that writes its own answer cannot honour it") -> APIError:
    """The 400 for a field of another API that a translated request cannot carry."""
    return APIError(
        400,
        f"{param!r}: {why}; send the request without it, or use policy none or srgen",
        param=param,
        code="unsupported_parameter",
    )


def one_answer_request(
    endpoint: Endpoint,
    body: dict[str, Any],
    model: str,
    *,
    max_tokens: int | None,
    stream: bool | None,
    stop: list[str] | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> ClientRequest:
    """The request as a policy reads it, for the APIs that ask for one answer and always report usage
    (Responses, Messages): relayed as sent (`messages` None), or translated into chat."""
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        n=1,
        max_tokens=max_tokens,
        seed=body.get("seed"),
        stop=stop or [],
        stream=bool(stream),
        include_usage=True,
        messages=messages,
        prompt=None,
    )
