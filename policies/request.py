"""The client's request as a policy sees it: typed, read once by the route, the same for every policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from refine_server.policies.base import PolicyRequestError
from refine_server.policies.relayed import STREAM_FORMATS, StreamFormat

# The generation endpoints refine serves. A policy that writes its own answer reads "chat" or "completions"
# (refine translates a Responses or Messages request into chat for it); a relaying policy (`none`, SRGen) may
# see any of them, and forwards the body to vLLM's endpoint of the same name.
Endpoint = Literal["chat", "completions", "responses", "messages"]
PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}

Prompt = str | list[str] | list[int] | list[list[int]]


@dataclass(frozen=True)
class ClientRequest:
    endpoint: Endpoint
    body: dict[str, Any]  # the OpenAI body as the client sent it, `refine` removed: what a relay forwards
    model: str
    n: int
    max_tokens: int | None  # max_completion_tokens, else max_tokens, else the server's default; None: no cap
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage
    messages: list[dict[str, Any]] | None  # chat
    prompt: Prompt | None  # completions
    max_tokens_defaulted: bool = False  # max_tokens is the server's default: the client set none

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]

    @property
    def stream_format(self) -> StreamFormat:
        """How this endpoint's stream is relayed: the events that carry tokens, the one that ends the answer."""
        return STREAM_FORMATS[self.endpoint]

    @property
    def num_prompts(self) -> int:
        """Completions take a batch of prompts (a list of strings or of token-id lists); chat takes one."""
        p = self.prompt
        return len(p) if isinstance(p, list) and p and isinstance(p[0], str | list) else 1

    @property
    def num_choices(self) -> int:
        """Choices in the answer: n for each prompt."""
        return self.n * self.num_prompts

    def one_prompt(self, policy: str) -> str | list[int]:
        """The completions prompt of a policy that answers one prompt: a string or one list of token ids
        (a batch of exactly one is unwrapped)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
            p = p[0]
        if isinstance(p, str) or _is_token_ids(p):
            return p
        raise PolicyRequestError(f"policy {policy} needs one prompt: a string or a list of token ids", "prompt")

    def asks_for(self, field: str) -> bool:
        """Whether the request asks for `field`'s feature. A value that asks for nothing (null, false, an empty
        list, `tool_choice: "none"`, `response_format: {"type": "text"}`) does not: clients such as LangChain
        send some of these by default. A number does, 0 included (completions' `logprobs: 0` asks for the
        sampled token's logprob)."""
        value = self.body.get(field)
        if value is None or value is False or value == [] or value == {}:
            return False
        if field == "tool_choice":
            return value != "none"
        if field == "response_format":
            return not (isinstance(value, dict) and value.get("type") == "text")
        return True

    def require_one_choice(self, policy: str, why: str) -> None:
        if self.n != 1:
            raise PolicyRequestError(f"policy {policy} {why}: n must be 1", "n")

    def question(self, policy: str) -> tuple[list[dict[str, Any]], str]:
        """The chat messages before the last one, and the last one's text: the question a policy answers.
        A 400 when the conversation does not end with a user message of text."""
        messages = self.messages or [{}]
        last = messages[-1]
        if last.get("role") != "user":
            raise PolicyRequestError(
                f"policy {policy} answers the last message, which must come from the user", "messages"
            )
        content = last.get("content")
        if isinstance(content, list):
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
                raise PolicyRequestError(
                    f"policy {policy} reads text only: the last message has non-text parts", "messages"
                )
            content = "\n".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise PolicyRequestError("the last user message has no text to answer", "messages")
        return messages[:-1], content


def _is_token_ids(prompt: Prompt | None) -> TypeGuard[list[int]]:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
