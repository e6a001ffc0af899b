"""What refine sets on every engine call of a request where the call itself does not: a length bound and the
request's engine priority.

vLLM generates to the end of the context when a call names no max_tokens, and schedules first come, first
served unless a call carries a priority. A policy's own calls are written for its algorithm and need not know
either: `EngineClient` fills them in from one `CallFields` per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class CallFields:
    max_tokens: int | None = None  # for a call that names no length (None: leave it to the engine)
    priority: int | None = None  # the engine's scheduling priority, lower first (None: send none)
    # Whether a relayed stream asks the engine for its usage, so a key's token budget counts it (the chunk is
    # dropped again where the client did not ask for it).
    count_stream_usage: bool = False

    def fill(self, body: dict[str, Any], length_field: str = "max_tokens") -> dict[str, Any]:
        """`body`, or a copy of it with what it leaves out (the length as `length_field`, the name of the
        endpoint it goes to); a priority the body has (a client's, where the operator opened the field) stays."""
        missing: dict[str, Any] = {}
        if self.max_tokens is not None and all(body.get(f) is None for f in (*_LENGTH_FIELDS, length_field)):
            missing[length_field] = self.max_tokens
        if self.priority is not None and "priority" not in body:
            missing["priority"] = self.priority
        return {**body, **missing} if missing else body
