"""`none`: the request goes to vLLM unchanged. The baseline every other policy is measured against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from refine_server.policies.base import Policy, PolicyCall, PolicyParams
from refine_server.policies.relayed import RelayedChunk


class NonePolicy(Policy):
    name = "none"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        return await call.engine.relay(call.request.body)

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[RelayedChunk]:
        async for chunk in call.engine.relay_stream(call.request.body):
            yield chunk
