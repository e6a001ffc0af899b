"""Which vLLM-specific request fields a client may send through refine.

refine passes a request's fields to vLLM as the client wrote them, with two exceptions:
- **refine's own engine arguments** (`vllm_xargs` keys starting with `refine_`) are refine's to set: they
  switch on an in-engine policy, and a client setting them directly would bypass this server's limits, its
  per-key rules, its traces and its metrics. They are always refused.
- **fields that change scheduling or resources for every request on the engine** (`RESTRICTED_FIELDS`, and
  every other `vllm_xargs` key, which reaches whatever logits-processor plugins the engine has) are refused
  unless the operator lists them in `client_engine_fields`. Closed by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from refine_server.contract.protocol import RESERVED_XARGS_PREFIX
from refine_server.errors import invalid_request

XARGS = "vllm_xargs"

# Each of these affects other requests than the one that sends it.
RESTRICTED_FIELDS: dict[str, str] = {
    "priority": "reorders the engine's queue under priority scheduling",
    "request_id": "names the request inside the engine, where ids must be unique",
    "kv_transfer_params": "drives disaggregated prefill's KV-cache transfers",
    "ec_transfer_params": "drives encoder-cache transfers between engines",
    "data_parallel_rank": "pins the request to one data-parallel engine",
}


def check_allow_list(allowed: Iterable[str]) -> frozenset[str]:
    """The configured allow-list, checked at start-up: every entry must name something that can be opened."""
    entries = frozenset(allowed)
    for entry in entries:
        if entry.startswith(f"{XARGS}."):
            key = entry.removeprefix(f"{XARGS}.")
            if not key or key.startswith(RESERVED_XARGS_PREFIX):
                raise ValueError(
                    f"client_engine_fields: {entry!r} cannot be opened to clients "
                    f"({XARGS} keys starting {RESERVED_XARGS_PREFIX!r} are refine's own)"
                )
        elif entry not in RESTRICTED_FIELDS:
            raise ValueError(
                f"client_engine_fields: unknown entry {entry!r}; entries are "
                f"{', '.join(sorted(RESTRICTED_FIELDS))} or '{XARGS}.KEY'"
            )
    return entries


def check_engine_fields(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """A 400 naming the first field a client may not send through this server."""
    for name, why in RESTRICTED_FIELDS.items():
        if name in body and name not in allowed:
            raise invalid_request(
                f"{name} is not accepted by this server: it {why}, so it is closed to "
                "clients unless the operator allows it (client_engine_fields)",
                name,
            )
    xargs = body.get(XARGS)
    if xargs is None:
        return
    if not isinstance(xargs, dict):
        raise invalid_request(f"{XARGS} must be an object", XARGS)
    for key in xargs:
        param = f"{XARGS}.{key}"
        if str(key).startswith(RESERVED_XARGS_PREFIX):
            raise invalid_request(
                f"{param} is refine's own engine argument; choose an in-engine policy with "
                '{"refine": {"policy": ...}} instead',
                param,
            )
        if param not in allowed:
            raise invalid_request(
                f"{param} is not accepted by this server: {XARGS} reach the engine's plugins "
                "and are closed to clients unless the operator allows a key "
                "(client_engine_fields)",
                param,
            )
