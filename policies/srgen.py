"""SRGen, the proxy side: switch refine's engine plugin on for a request and turn its events into the trace.

The algorithm runs inside vLLM (`engine_plugin/srgen.py`, driven by the plugin's logits processors), from
hidden states the engine already computed. Here the request gets signed `vllm_xargs` naming the policy and
its parameters, and a unique `cache_salt`; when a choice finishes, the plugin's events (admissions,
corrections, problems) become the response's trace.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refine_server.contract.params import SRGEN, SRGenLimits, SRGenParams
from refine_server.contract.protocol import REQUEST_KEY_ARG, discard_events, read_events, signed_xargs
from refine_server.policies.base import CORRECTION_SECONDS, CORRECTIONS, Policy, PolicyCall
from refine_server.policies.relayed import RelayedChunk

if TYPE_CHECKING:
    from refine_server.policies.engine_client import EngineClient


class SRGenPolicy(Policy[SRGenParams]):
    name = SRGEN
    Params = SRGenParams
    Limits = SRGenLimits
    needs_engine_plugin = True
    relays_request = True
    metrics = (*Policy.metrics, CORRECTIONS)

    async def complete(self, call: PolicyCall, params: SRGenParams) -> dict[str, Any]:
        body = _engine_body(call, params)
        key = body["vllm_xargs"][REQUEST_KEY_ARG]
        folder = call.engine.link.events_dir
        try:
            result = await call.engine.relay(body)
            _fill_trace(call, folder, key)
            return result
        finally:
            discard_events(folder, key)

    async def stream(self, call: PolicyCall, params: SRGenParams) -> AsyncGenerator[RelayedChunk, None]:
        body = _engine_body(call, params)
        key = body["vllm_xargs"][REQUEST_KEY_ARG]
        folder = call.engine.link.events_dir
        finishing = call.request.stream_format.may_finish
        try:
            async for chunk in call.engine.relay_stream(body):
                # Every correction of a choice is on disk before its last token leaves the engine, so the
                # trace is complete whenever a choice finishes; refine attaches it to the last such chunk.
                if finishing(chunk):
                    _fill_trace(call, folder, key)
                yield chunk
        finally:
            discard_events(folder, key)


def _engine_body(call: PolicyCall, params: SRGenParams) -> dict[str, Any]:
    # The client's own vllm_xargs (only keys the operator opened) travel alongside refine's.
    fields = srgen_fields(call.engine, params)
    return {
        **call.request.body,
        **fields,
        "vllm_xargs": {**(call.request.body.get("vllm_xargs") or {}), **fields["vllm_xargs"]},
    }


def srgen_fields(engine: EngineClient, params: SRGenParams) -> dict[str, Any]:
    """The request fields that switch SRGen on for one engine request: signed `vllm_xargs` naming it, and a
    unique cache salt, because SRGen needs the hidden state of every context position and a cached prefix is
    never recomputed. Any policy's engine call can carry them (CyberV's `decode`)."""
    xargs = signed_xargs(engine.link.secret or "", SRGEN, params.model_dump_json())
    return {"vllm_xargs": xargs, "cache_salt": xargs[REQUEST_KEY_ARG]}


def srgen_report(engine: EngineClient, fields: dict[str, Any]) -> dict[str, Any]:
    """What SRGen did in the engine request made with `fields` (its events, read once and discarded)."""
    folder, key = engine.link.events_dir, fields["vllm_xargs"][REQUEST_KEY_ARG]
    try:
        return _report(read_events(folder, key))
    finally:
        discard_events(folder, key)


def _fill_trace(call: PolicyCall, folder: Path, key: str) -> None:
    report = call.trace.data = _report(read_events(folder, key))
    corrections = report["corrections"]
    call.trace.record(CORRECTIONS, None if corrections is None else len(corrections))
    if corrections is not None:
        call.trace.record(CORRECTION_SECONDS, sum(c["seconds"] for c in corrections))


def _report(events: list[dict[str, Any]] | None) -> dict[str, Any]:
    if events is None:
        return {
            "engine_events": "unavailable: the engine's event file was not found (do refine and vLLM share "
            "engine_events_dir? corrections, if any, were made but cannot be listed)",
            "num_corrections": None,
            "corrections": None,
        }
    corrections = _of_kind(events, "correction")
    # Triggers the engine's per-step limit left uncorrected (the token was decoded as the engine had it).
    skipped = _of_kind(events, "skipped")
    problems = sorted({e["reason"] for e in events if e["event"] in ("unavailable", "failed")})
    return {
        "engine_events": "reported" if not problems else "SRGen stopped early: " + "; ".join(problems),
        "sequences": sum(1 for e in events if e["event"] == "admitted"),
        "num_corrections": len(corrections),
        "corrections": corrections,
        **({"skipped": skipped} if skipped else {}),
    }


def _of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == kind]
