"""`none`: the request goes to vLLM unchanged. The baseline every other policy is measured against.

`{"refine": {"policy": "none", "token_stats": true}}` (non-streaming) also puts a summary of each choice's
token statistics, measured inside the engine, in the trace: `{"token_stats": "reported", "choices": [{"index",
"tokens", "mean_entropy", "max_entropy"}, ...]}`. The answer is the engine's as without the option. On a backend
that cannot report them the answer still comes back and the trace says `"token_stats": "unavailable: ..."`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from pydantic import Field

from refine_server.policies.base import Policy, PolicyCall, PolicyParams, PolicyRequestError
from refine_server.policies.relayed import RelayedChunk
from refine_server.policies.token_stats import TokenStatsUnavailable


class NoneParams(PolicyParams):
    token_stats: bool = Field(False, description="summarise each choice's in-engine token statistics in the trace")


class NonePolicy(Policy[PolicyParams]):
    name = "none"
    Params = NoneParams
    relays_request = True

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        if not _wants_token_stats(params):
            return await call.engine.relay(call.request.body)
        if call.request.endpoint not in ("chat", "completions"):
            raise PolicyRequestError(
                "refine.token_stats summarises choices: it is for the chat and completions endpoints",
                "refine.token_stats",
            )
        return await _with_token_stats_summary(call)

    def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncGenerator[RelayedChunk, None]:
        if _wants_token_stats(params):
            raise PolicyRequestError("refine.token_stats is for non-streaming requests", "refine.token_stats")
        # The engine's stream itself, not re-yielded by a generator of this policy: one step less per token.
        return call.engine.relay_stream(call.request.body)


def _wants_token_stats(params: PolicyParams) -> bool:
    # Pass-through policies built on this one may have parameters of their own, without the option.
    return isinstance(params, NoneParams) and params.token_stats


async def _with_token_stats_summary(call: PolicyCall) -> dict[str, Any]:
    try:
        result, stats = await call.engine.relay_with_token_stats(call.request.body)
    except TokenStatsUnavailable as exc:
        call.trace.data = {"token_stats": f"unavailable: {exc}"}
        return await call.engine.relay(call.request.body)
    if not call.request.body.get("return_token_ids"):  # the sensor needed them; the client did not ask
        result.pop("prompt_token_ids", None)
        for choice in result.get("choices") or ():
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
    call.trace.data = {
        "token_stats": "reported",
        "choices": [{"index": index, **stats[index].summary()} for index in sorted(stats)],
    }
    return result
