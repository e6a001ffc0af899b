"""What refine checks in an OpenAI request before anything reaches the backend.

Only the fields refine itself relies on are typed here; every other field passes through untouched, so
whatever the official openai client sends reaches vLLM as sent. Types are strict: `"n": "2"` is an error,
as it is for OpenAI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from refine_server.policies.request import ClientRequest, Endpoint


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class RefineSpec(_Open):
    """The `refine` object: a policy name and that policy's parameters (validated by the policy)."""

    policy: str | None = None

    def policy_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StreamOptions(_Open):
    include_usage: bool | None = None


class _GenerationRequest(_Open):
    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    refine: RefineSpec | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def client_request(self, endpoint: Endpoint, body: dict[str, Any]) -> ClientRequest:
        """What policies receive: this request typed, with `body` (the client's, `refine` removed) to forward."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return ClientRequest(
            endpoint=endpoint, body=body, model=self.model, n=self.n or 1, max_tokens=self.requested_max_tokens(),
            seed=self.seed, stop=stop, stream=bool(self.stream),
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            messages=getattr(self, "messages", None), prompt=getattr(self, "prompt", None),
        )


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
