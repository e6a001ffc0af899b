"""What a policy is: its parameters (a pydantic model), its server-side limits, its algorithm and its trace.

A policy receives one OpenAI request (chat or completions, `refine` object removed) and a backend to call,
and answers it: either as one OpenAI response (`complete`) or as a stream of OpenAI chunks (`stream`).
It records what it did in its `Trace`, which refine returns to the client in the response's `refine` block.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

# The parameter models live beside the engine plugin, which validates in-engine policies' parameters too;
# policies import them from here.
from refine_server.engine_plugin.params import LimitExceeded, PolicyLimits, PolicyParams, enforce_limits  # noqa: F401
from refine_server.errors import invalid_request

if TYPE_CHECKING:
    from refine_server.backend import Backend

T = TypeVar("T")

Endpoint = Literal["chat", "completions"]
PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class Trace:
    """What a policy did for one request. `data` goes to the client; the numbers to Prometheus."""

    data: dict[str, Any] = field(default_factory=dict)
    correction_seconds: float = 0.0
    corrections: int | None = None  # None: the policy does not correct, or could not tell
    rounds: int | None = None  # rounds of generation, for policies that decide in rounds
    extra_tokens: int | None = None  # tokens generated beyond the answer returned (candidates, rechecks)
    # Policies that search (RAIN): iterations, iterations whose work was rewound for good, and engine calls.
    search_iterations: int | None = None
    rewinds: int | None = None
    engine_calls: int | None = None


@dataclass
class PolicyCall:
    endpoint: Endpoint
    body: dict[str, Any]
    backend: Backend
    trace: Trace = field(default_factory=Trace)

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]


@dataclass
class AnswerShapes:
    """The OpenAI bodies of one answer (a single choice) for a policy that writes its own response: the
    whole response, and the stream's chunks."""

    endpoint: Endpoint
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.endpoint == "chat" else "cmpl-") + uuid.uuid4().hex

    def response(self, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def piece(self, text: str, first: bool) -> dict[str, Any]:
        """A chunk carrying the next piece of text (a chat stream's first chunk also carries the role)."""
        if self.endpoint == "chat":
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return self.chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
        return self.chunk([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        last = {"delta": {}} if self.endpoint == "chat" else {"text": ""}
        return self.chunk([{"index": 0, **last, "finish_reason": finish_reason, "logprobs": None}])


class Policy(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    Limits: ClassVar[type[PolicyLimits]] = PolicyLimits
    # True when the policy runs inside vLLM: refine refuses it on a backend without refine's engine plugin.
    needs_engine_plugin: ClassVar[bool] = False

    @abstractmethod
    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        """Answer a non-streaming request with one OpenAI response body."""

    @abstractmethod
    def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any]]:
        """Answer a streaming request with OpenAI chunk bodies, in order, as soon as each is known."""


async def run_together(*work: Awaitable[T]) -> list[T]:
    """Run a policy's engine calls concurrently; the first failure cancels the rest (no engine work is left
    running for a request that has failed) and is raised as itself, not as an exception group."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in work]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [t.result() for t in tasks]


def chat_question(messages: list[dict[str, Any]], policy: str) -> tuple[list[dict[str, Any]], str]:
    """The messages before the last one, and the last one's text: the question a policy answers. A 400 when
    the conversation does not end with a user message of text."""
    last = messages[-1]
    if last.get("role") != "user":
        raise invalid_request(f"policy {policy} answers the last message, which must come from the user", "messages")
    content = last.get("content")
    if isinstance(content, list):
        if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
            raise invalid_request(f"policy {policy} reads text only: the last message has non-text parts", "messages")
        content = "\n".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str):
        raise invalid_request("the last user message has no text to answer", "messages")
    return messages[:-1], content
