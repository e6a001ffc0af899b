"""Policies for the proxy's unit tests, refine served in a thread in front of a backend, and what the tests
read of it while requests run."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.base import (
    CORRECTIONS,
    ROUNDS,
    Policy,
    PolicyCall,
    PolicyLimits,
    PolicyMetric,
    PolicyParams,
    PolicyRequestError,
)
from refine_server.policies.none import NonePolicy
from refine_server.policies.relayed import ACCEPTED
from tests.fake_vllm import serve_in_thread


class StepsParams(PolicyParams):
    max_steps: int = 3


class StepsLimits(PolicyLimits):
    max_steps: int | None = 5


class StepsPolicy(NonePolicy):
    """A pass-through with a bounded parameter: checks validation and limits without any real algorithm."""

    name = "steps"
    Params = StepsParams
    Limits = StepsLimits


class InEnginePolicy(NonePolicy):
    name = "in_engine"
    needs_engine_plugin = True


class WidgetPolicy(NonePolicy):
    """A policy with a metric of its own: declared, recorded in the trace, and the server does the rest."""

    name = "widgets"
    WIDGETS = PolicyMetric("refine_test_widgets", "Widgets made per request", "counter")
    metrics = (*NonePolicy.metrics, WIDGETS)

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        call.trace.record(self.WIDGETS, 3)
        return await super().complete(call, params)


class CountingPolicy(NonePolicy):
    """Counts what a correcting policy counts (2 corrections in 1 round), as its summary headers report."""

    name = "counting"
    metrics = (*NonePolicy.metrics, CORRECTIONS, ROUNDS)

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        call.trace.record(CORRECTIONS, 2)
        call.trace.record(ROUNDS, 1)
        return await super().complete(call, params)


class BrokenPolicy(NonePolicy):
    """A policy with a bug: it fails at once when not streaming, and after its first chunk when streaming."""

    name = "broken"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        raise RuntimeError("a bug in a policy")

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any] | bytes]:
        async for chunk in call.engine.relay_stream(call.request.body):
            yield chunk
            if chunk != ACCEPTED:  # the engine's first event, not its acceptance
                raise RuntimeError("a bug in a policy, mid-stream")


class PickyPolicy(NonePolicy):
    """Serves only prompts that start with "ok", streaming or not."""

    name = "picky"

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any] | bytes]:
        if not str(call.request.prompt).startswith("ok"):
            raise PolicyRequestError("policy picky serves prompts that start with 'ok'", "prompt")
        async for chunk in super().stream(call, params):
            yield chunk


class EchoPolicy(Policy):
    """Writes its own answer, as CyberV and RAIN do: the last message's text, reversed word by word, as a chat
    completion (or its chunks, a word each), with no engine call. What the Responses and Messages front ends
    translate for."""

    name = "echo"
    refuses_fields = ("tools",)

    @staticmethod
    def _words(call: PolicyCall) -> list[str]:
        _, question = call.request.question("echo")
        return list(reversed(question.split()))

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        call.trace.data = {"messages": call.request.messages}
        words = self._words(call)
        finish = "length" if call.request.max_tokens and call.request.max_tokens < len(words) else "stop"
        return {
            "id": "echo-1",
            "object": "chat.completion",
            "created": 0,
            "model": call.request.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish}
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)},
        }

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any] | bytes]:
        words = self._words(call)
        for i, word in enumerate(words):
            yield {
                "id": "echo-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": call.request.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": (" " if i else "") + word},
                        "finish_reason": "stop" if i == len(words) - 1 else None,
                    }
                ],
            }
        yield {
            "id": "echo-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": call.request.model,
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)},
        }


class DraftingPolicy(NonePolicy):
    """A policy that makes an engine call of its own, naming no max_tokens and no priority."""

    name = "drafting"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        return await call.engine.completions("draft", "hi")


def _serve(settings: Settings):
    registry = PolicyRegistry(
        [
            NonePolicy,
            StepsPolicy,
            InEnginePolicy,
            WidgetPolicy,
            CountingPolicy,
            BrokenPolicy,
            PickyPolicy,
            EchoPolicy,
            DraftingPolicy,
        ],
        settings.policy_limits,
    )
    return serve_in_thread(create_app(settings, registry))


def admission(url: str, policy: str) -> dict[str, Any]:
    """`policy`'s admission as GET /v1/refine/policies shows it: limit, running, waiting, ..."""
    policies = httpx.get(f"{url}/v1/refine/policies").json()["data"]
    return next(p for p in policies if p["name"] == policy)["admission"]


def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait until `condition()` holds, failing the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
