"""CyberV's parameters (the request's `refine` fields) and the server's caps on them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refine_server.contract.params import SRGenParams
from refine_server.policies.base import PolicyLimits, PolicyParams
from refine_server.policies.confidence import Variant


class SRGenDecode(SRGenParams):
    """SRGen's parameters, for decoding cyberv's engine calls with it."""

    policy: Literal["srgen"] = Field(description="the in-engine policy that decodes cyberv's generations")

    def srgen(self) -> SRGenParams:
        return SRGenParams(**self.model_dump(exclude={"policy"}))


class CyberVParams(PolicyParams):
    """Defaults are the official VideoMMMU script's (n, theta) and sampling (top_p, top_k) values."""

    n: int = Field(8, ge=2, description="candidates in round 1: the direct answer and n-1 reasoning samples")
    theta: float = Field(0.3, ge=0, le=1, description="the best answer's summed score must exceed n * theta")
    reasoning_temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature of the reasoning samples")
    reasoning_top_p: float = Field(0.5, gt=0, le=1, description="top_p of the reasoning samples")
    reasoning_top_k: int = Field(5, ge=-1, description="top_k of the reasoning samples (-1 or 0: no limit)")
    max_reasoning_tokens: int = Field(256, ge=1, description="tokens per round-1 candidate at most")
    feedback_temperature: float = Field(0.01, ge=0, le=2, description="temperature of the feedback round")
    max_feedback_tokens: int = Field(256, ge=1, description="tokens of the feedback round's answer at most")
    adaptive: bool = Field(True, description="draw round 1 in batches and stop once the decision cannot change")
    batch_size: int = Field(2, ge=1, description="reasoning samples per engine call when adaptive")
    stop_risk: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="adaptive: also stop when one decision of all n comes out of at least "
        "1 - stop_risk of random completions of round 1; 0: only when certain",
    )
    decode: SRGenDecode | None = Field(
        None,
        description='decode every engine call of cyberv with an in-engine policy: {"policy": "srgen", '
        "...SRGen's parameters}; needs refine's engine plugin upstream",
    )
    sensor: Literal["auto", "top_logprobs"] = Field(
        "auto",
        description="auto: the engine's token statistics where the upstream has refine's plugin, else "
        "top_logprobs; top_logprobs: always the API's (to compare the two)",
    )
    progress: bool = Field(False, description="streaming: send progress chunks (no choices) before the answer")
    confidence_stop: bool = Field(
        False,
        description="DeepConf's online stop: round 1's first batch of reasoning samples is the warmup, and later "
        "samples stop inside vLLM once their group confidence falls below the threshold it gives (drawn in "
        "batches even when not adaptive); a stopped sample has no answer. Needs refine's plugin upstream",
    )
    vote: Literal["score", "confidence"] = Field(
        "score",
        description="score: the official gate over the sensor's scores; confidence: each candidate weighs its "
        "lowest group confidence relative to the most confident candidate's (DeepConf's weights), the same gate "
        "over the sums. Needs refine's plugin upstream",
    )
    confidence_window: int = Field(64, ge=1, description="confidence options: tokens in the group confidence's window")
    confidence_variant: Variant = Field(
        "high", description="confidence_stop: the threshold at the 10th (high) or 90th (low) warmup percentile"
    )


class CyberVLimits(PolicyLimits):
    n: int | None = 16
    max_reasoning_tokens: int | None = 2048
    max_feedback_tokens: int | None = 2048
    confidence_window: int | None = 4096
