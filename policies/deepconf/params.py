"""DeepConf's parameters (the request's `refine` fields) and the server's caps on them.

Defaults are the authors' reproduce script's where they fit a small model on a CPU, scaled where they do not;
each field's description names the paper's value. The paper's setting is reachable by parameters:
`{"warmup": 16, "max_traces": 512, "window": 2048, "variant": "low", "max_trace_tokens": 64000}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from refine_server.contract.params import MAX_CONFIDENCE_K
from refine_server.policies.base import PolicyLimits, PolicyParams
from refine_server.policies.confidence import Variant


class DeepConfParams(PolicyParams):
    warmup: int = Field(
        4, ge=1, description="traces drawn in full to set the stop threshold (paper: 16; 4 keeps a CPU request short)"
    )
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="a fixed stop threshold instead of the warmup's (the reproduce script's predefined "
        "thresholds): no warmup is drawn",
    )
    max_traces: int = Field(16, ge=1, description="traces at most, warmup included (paper: 512, reproduce script: 256)")
    batch_size: int = Field(
        4, ge=1, description="traces per engine call after the warmup; the consensus is checked after each batch"
    )
    variant: Variant = Field(
        "high",
        description="high: the threshold at the 10th percentile of the warmup's lowest group confidences (keeps "
        "the top 90%); low: the 90th percentile (keeps the top 10%, the paper's aggressive setting)",
    )
    window: int = Field(
        64,
        ge=1,
        description="tokens in the sliding window of the group confidence (paper: 2048; answers of the "
        "bundled models are tens to a few hundred tokens, so 2048 would never fill)",
    )
    stop_after: int | None = Field(
        None, ge=1, description="tokens before the stop may act (default: `window`, as the authors' code)"
    )
    confidence_k: int = Field(
        MAX_CONFIDENCE_K,
        ge=1,
        le=MAX_CONFIDENCE_K,
        description="k of the token confidence -(1/k) * sum of the top-k log probabilities (paper: 20)",
    )
    tau: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="stop drawing once the leading answer holds this share of the vote's weight (optillm: 0.95); "
        "null: draw all max_traces",
    )
    early_stop: bool = Field(
        True,
        description="stop later traces in the engine below the threshold, and let only traces at or above it "
        "vote; false: every trace runs in full and votes (self-consistency with `vote: majority`)",
    )
    vote: Literal["confidence", "majority"] = Field(
        "confidence", description="confidence: each trace weighs its lowest group confidence; majority: 1 each"
    )
    temperature: float = Field(0.6, ge=0, le=2, description="sampling temperature of every trace (scripts: 0.6)")
    top_p: float = Field(0.95, gt=0, le=1, description="top_p of every trace (scripts: 0.95)")
    max_trace_tokens: int = Field(
        256, ge=1, description="tokens per trace at most, capped by the client's max_tokens (scripts: 64000)"
    )
    sensor: Literal["auto", "top_logprobs"] = Field(
        "auto",
        description="auto: the engine measures and stops where the upstream has refine's plugin, else the proxy "
        "reads top_logprobs and aborts the stream; top_logprobs: always the proxy (to compare the two)",
    )
    progress: bool = Field(False, description="streaming: send progress chunks (no choices) before the answer")

    @field_validator("max_traces")
    @classmethod
    def _room_for_the_warmup(cls, value: int, info: ValidationInfo) -> int:
        # A fixed threshold draws no warmup.
        if info.data.get("threshold") is None and value < info.data.get("warmup", 1):
            raise ValueError("max_traces must be at least warmup (the warmup's traces count in the budget)")
        return value

    @property
    def first_check(self) -> int:
        """Tokens that must exist before the stop may act."""
        return self.stop_after if self.stop_after is not None else self.window


class DeepConfLimits(PolicyLimits):
    max_traces: int | None = 64
    warmup: int | None = 32
    batch_size: int | None = 16
    window: int | None = 4096
    max_trace_tokens: int | None = 4096
