"""SRGen: entropy-triggered corrective vectors (Self-Reflective Generation at Test Time, arXiv 2510.02919).

Every decode step, per sequence:
- **Monitor**: the entropy of the next-token distribution at the request's temperature is compared with a
  dynamic threshold over the sequence's last `window` entropies:
  `tau = max(mean + k * max(std, min_std), min_threshold)` (a fixed `warmup_threshold` until `window`
  entropies exist). The current entropy joins the history after tau is computed.
- **Reflect** where `H > tau` (at most `max_corrections` times): one vector `delta` in hidden space, added to
  the final hidden state of every context position, is optimised for `steps` AdamW steps against
  `(1 - lam) * CE(whole context) + lam * entropy(current position)`; the current token is then drawn from
  `lm_head(h_current + delta)` and delta is dropped. The KV cache is untouched (delta lives after the last layer).

This runs inside vLLM (see `refine_server/engine_plugin.py`), from hidden states the engine already
computed, for all triggered rows of a step at once: the official code instead stops generation and
re-prefills the whole context for every trigger, one sequence at a time.

The proxy side (`SRGenPolicy`) only switches the plugin on through `vllm_xargs` and turns the events the
plugin reports into the response's trace.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from refine_server.engine_protocol import (
    PARAMS_ARG,
    POLICY_ARG,
    REQUEST_KEY_ARG,
    discard_events,
    read_events,
)
from refine_server.policies.base import Policy, PolicyCall, PolicyLimits, PolicyParams

if TYPE_CHECKING:
    import torch


class SRGenParams(PolicyParams):
    """Defaults are the official AIME script's values."""

    window: int = Field(25, ge=2, le=4096, description="N: entropies in the dynamic threshold's window")
    k: float = Field(4.0, ge=0, description="K: standard deviations above the mean that trigger")
    min_std: float = Field(0.5, ge=0)
    min_threshold: float = Field(1.8, ge=0, description="floor of the dynamic threshold (nats)")
    warmup_threshold: float = Field(3.0, ge=0, description="fixed threshold before `window` entropies exist")
    lam: float = Field(0.05, ge=0, le=1, description="weight of the entropy term in the reflection loss")
    lr: float = Field(0.01, gt=0, le=10)
    steps: int = Field(3, ge=1, le=100, description="AdamW steps per correction")
    max_corrections: int = Field(20, ge=0, le=10_000, description="corrections per sequence at most")


class SRGenLimits(PolicyLimits):
    steps: int | None = 10
    max_corrections: int | None = 64
    window: int | None = 1024


# ---- monitor ---------------------------------------------------------------------------------------------

@dataclass
class EntropyMonitor:
    """One sequence's entropy history and correction budget."""

    params: SRGenParams
    history: list[float] = field(default_factory=list)
    corrections: int = 0

    def threshold(self) -> float:
        p = self.params
        if len(self.history) < p.window:
            return p.warmup_threshold
        recent = self.history[-p.window:]
        return max(statistics.fmean(recent) + p.k * max(statistics.pstdev(recent), p.min_std), p.min_threshold)

    def observe(self, entropy: float) -> tuple[bool, float]:
        """Whether this step triggers a correction, and the threshold it was compared with."""
        tau = self.threshold()
        trigger = entropy > tau and self.corrections < self.params.max_corrections and math.isfinite(entropy)
        self.history.append(entropy)
        if trigger:
            self.corrections += 1
        return trigger, tau


# ---- reflect ---------------------------------------------------------------------------------------------

@dataclass
class ReflectionInput:
    """One triggered row: its context's final hidden states and token ids, and how to optimise."""

    hidden: torch.Tensor  # [L, d]: positions 0..L-1 of the context, the last one is the current position
    token_ids: torch.Tensor  # [L]: the tokens at those positions (ids[j+1] is what h[j] must predict)
    temperature: float
    params: SRGenParams


def reflect(rows: list[ReflectionInput], weight: torch.Tensor) -> torch.Tensor:
    """Optimise one delta per row (all rows together) and return the corrected logits of each current position.

    `weight` is lm_head's [V, d] matrix in float32. Rows are independent: each delta sees only its own loss,
    so summing the losses and stepping one AdamW over every delta is the same as optimising them one by one.
    """
    import torch

    from refine_server.kernels.srgen_loss import srgen_logits_row, srgen_loss_and_grad

    with torch.inference_mode(False):
        hidden = [r.hidden.detach().float().clone() for r in rows]
        targets = [r.token_ids[1:].detach().clone() for r in rows]
        deltas = [torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device, requires_grad=True)
                  for _ in rows]
        # AdamW as in the official code: weight_decay=1e-8, eps=1e-5, per-request learning rate.
        optimizer = torch.optim.AdamW(
            [{"params": [d], "lr": r.params.lr} for d, r in zip(deltas, rows)], weight_decay=1e-8, eps=1e-5
        )
        for step in range(max(r.params.steps for r in rows)):
            for row, h, y, delta in zip(rows, hidden, targets, deltas):
                if step < row.params.steps:
                    _, grad = srgen_loss_and_grad(h, delta.detach(), weight, y, row.temperature, row.params.lam)
                    delta.grad = grad
                else:
                    delta.grad = None  # this row has finished its own number of steps
            optimizer.step()
        return torch.stack([srgen_logits_row(h[-1], d.detach(), weight) for h, d in zip(hidden, deltas)])


# ---- proxy side ------------------------------------------------------------------------------------------

class SRGenPolicy(Policy):
    name = "srgen"
    Params = SRGenParams
    Limits = SRGenLimits
    needs_engine_plugin = True

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        key = uuid.uuid4().hex
        try:
            result = await call.backend.post_json(call.path, _engine_body(call, params, key), endpoint=call.endpoint)
            _fill_trace(call, key)
            return result
        finally:
            discard_events(key)

    async def stream(self, call: PolicyCall, params: PolicyParams) -> AsyncIterator[dict[str, Any]]:
        key = uuid.uuid4().hex
        try:
            async for chunk in call.backend.stream_json(
                call.path, _engine_body(call, params, key), endpoint=call.endpoint
            ):
                # Every correction of a choice happens before its last token leaves the engine, so the
                # trace is complete whenever a choice finishes; refine attaches it to the last such chunk.
                if any(c.get("finish_reason") for c in chunk.get("choices") or ()):
                    _fill_trace(call, key)
                yield chunk
        finally:
            discard_events(key)


def _engine_body(call: PolicyCall, params: PolicyParams, key: str) -> dict[str, Any]:
    xargs = dict(call.body.get("vllm_xargs") or {})
    xargs.update({POLICY_ARG: SRGenPolicy.name, PARAMS_ARG: params.model_dump_json(), REQUEST_KEY_ARG: key})
    # A unique cache salt keeps vLLM from reusing a cached prompt prefix: SRGen needs the hidden state of
    # every context position, and a cached prefix is never recomputed.
    return {**call.body, "vllm_xargs": xargs, "cache_salt": key}


def _fill_trace(call: PolicyCall, key: str) -> None:
    events = read_events(key)
    if events is None:
        call.trace.data = {
            "engine_events": "unavailable: the engine's event file was not found (is the backend on another "
                             "host? corrections, if any, were made but cannot be listed)",
            "num_corrections": None,
            "corrections": None,
        }
        call.trace.corrections = None
        return
    corrections = [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == "correction"]
    problems = sorted({e["reason"] for e in events if e["event"] == "unavailable"})
    call.trace.data = {
        "engine_events": "reported" if not problems else "SRGen stopped early: " + "; ".join(problems),
        "sequences": sum(1 for e in events if e["event"] == "admitted"),
        "num_corrections": len(corrections),
        "corrections": corrections,
    }
    call.trace.corrections = len(corrections)
    call.trace.correction_seconds = sum(c["seconds"] for c in corrections)
