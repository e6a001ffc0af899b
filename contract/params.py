"""Parameter models every policy uses (per-request parameters and the server's caps on them), SRGen's, and the
token-statistics sensor's (with its optional confidence stop).

They are part of the contract because in-engine policies validate their parameters in vLLM too (defence in
depth); this module imports nothing but pydantic, so the proxy and the engine share it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


def enforce_limits(params: PolicyParams, *limits: PolicyLimits) -> None:
    """Raise LimitExceeded for the first parameter above any of the given caps (server's, then an API key's)."""
    for caps in limits:
        for name, cap in caps:
            value = getattr(params, name)
            if cap is not None and value is not None and value > cap:
                raise LimitExceeded(name, value, cap)


# ---- SRGen: defined once, read by the proxy's policy and by the plugin ------------------------------------
SRGEN = "srgen"


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
    """The server's caps. The proxy enforces them, and so does the plugin with the copy it was given."""

    steps: int | None = 10
    max_corrections: int | None = 64
    window: int | None = 1024


class SRGenEngineSettings(BaseModel):
    """How much of the engine SRGen may take, whatever the requests ask: set by the operator, read by the plugin."""

    # Defaults by keyword: type checkers take a field's default only from `default=`, and the server's
    # settings build this model with no arguments.
    max_sequences: int = Field(
        default=16, ge=1, description="sequences running SRGen at once; later ones run without it"
    )
    max_rows_per_step: int = Field(
        default=4,
        ge=1,
        description="rows corrected in one engine step; a correction stalls the whole batch, so this bounds the stall",
    )


# ---- the token-statistics sensor and its confidence stop (DeepConf) ---------------------------------------
MAX_CONFIDENCE_K = 20  # vLLM's top_logprobs limit, and the k of the DeepConf authors' scripts
MAX_STOP_WINDOW = 32_768  # the largest window a confidence stop may keep, whatever the server's cap


class ConfidenceStopParams(PolicyParams):
    """DeepConf's online stop, run in the engine: once at least `stop_after` tokens exist and the mean token
    confidence over the last `window` of them falls below `threshold`, the sequence may only end (EOS)."""

    threshold: float = Field(
        allow_inf_nan=False, description="group confidence below which the sequence stops (finite)"
    )
    window: int = Field(
        default=64, ge=1, le=MAX_STOP_WINDOW, description="tokens in the sliding window of the group confidence"
    )
    stop_after: int | None = Field(
        default=None, ge=1, description="tokens before the stop may act (default: `window`, as the authors' code)"
    )

    @property
    def first_check(self) -> int:
        """Tokens that must exist before the stop may act."""
        return self.stop_after if self.stop_after is not None else self.window


class TokenStatsParams(PolicyParams):
    """What a request asks of the sensor: the k of the confidence it reports, and optionally a confidence stop."""

    confidence_k: int = Field(
        default=MAX_CONFIDENCE_K,
        ge=1,
        le=MAX_CONFIDENCE_K,
        description="k of the token confidence -(1/k) * sum of the top-k log probabilities",
    )
    stop: ConfidenceStopParams | None = None


class ConfidenceStopLimits(PolicyLimits):
    """The server's cap on the stop's window (the plugin keeps it per sequence)."""

    window: int | None = 4096
