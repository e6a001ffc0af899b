"""What a policy is: its parameters (a pydantic model), its server-side limits, its algorithm and its trace.

A policy receives one OpenAI request (chat or completions, `refine` object removed) and a backend to call,
and answers it: either as one OpenAI response (`complete`) or as a stream of OpenAI chunks (`stream`).
It records what it did in its `Trace`, which refine returns to the client in the response's `refine` block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from refine_server.backend import Backend

Endpoint = Literal["chat", "completions"]
PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class PolicyParams(BaseModel):
    """A policy's per-request parameters. Unknown fields are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")


class PolicyLimits(BaseModel):
    """Server-side caps on a policy's parameters: each field caps the parameter of the same name."""

    model_config = ConfigDict(extra="forbid")


class LimitExceeded(ValueError):
    def __init__(self, param: str, value: Any, cap: Any):
        super().__init__(f"{param}={value} exceeds this server's limit of {cap}")
        self.param = param


def enforce_limits(params: PolicyParams, limits: PolicyLimits) -> None:
    for name, cap in limits:
        value = getattr(params, name)
        if cap is not None and value is not None and value > cap:
            raise LimitExceeded(name, value, cap)


@dataclass
class Trace:
    """What a policy did for one request. `data` goes to the client; the numbers to Prometheus."""

    data: dict[str, Any] = field(default_factory=dict)
    correction_seconds: float = 0.0
    corrections: int | None = None  # None: the policy does not correct, or could not tell
    rounds: int | None = None  # rounds of generation, for policies that decide in rounds
    extra_tokens: int | None = None  # tokens generated beyond the answer returned (candidates, rechecks)


@dataclass
class PolicyCall:
    endpoint: Endpoint
    body: dict[str, Any]
    backend: Backend
    trace: Trace = field(default_factory=Trace)

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]


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
