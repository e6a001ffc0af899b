"""`auto`'s parameters (the request's `refine` fields): which policy to escalate to, on which signal, at which
threshold."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refine_server.policies.auto.signals import Signal
from refine_server.policies.base import PolicyLimits, PolicyParams

# The policies `auto` may escalate to. `none` would change nothing and `auto` would recurse: a 400 naming
# `refine.escalate.policy`, as an unknown name is (deepconf is offered once the server registers it).
ESCALATIONS = ("cyberv", "deepconf", "rain", "srgen")
DEFAULT_WINDOW = 64  # DeepConf's group window, scaled to small models' short answers (the paper: 1024-2048)


class Escalation(BaseModel):
    """`{"policy": NAME, ...that policy's own parameters}`: validated and capped by the server as that policy's
    own are, when it resolves the request."""

    model_config = ConfigDict(extra="allow")

    policy: str = Field(description="the policy run when the first answer is unsure: " + ", ".join(ESCALATIONS))

    @field_validator("policy")
    @classmethod
    def _escalatable(cls, name: str) -> str:
        if name not in ESCALATIONS:
            raise ValueError(f"auto escalates to one of {', '.join(ESCALATIONS)}, not {name!r}")
        return name

    def params(self) -> dict[str, object]:
        return dict(self.model_extra or {})


class AutoParams(PolicyParams):
    escalate: Escalation = Field(
        default_factory=lambda: Escalation(policy="cyberv"),
        description='the policy run when the first answer is unsure, with its parameters: {"policy": "cyberv", ...}',
    )
    signal: Signal = Field(
        "lowest_group_confidence",
        description="the first answer's measure that decides (see the README's auto section for each)",
    )
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="the signal's value that counts as sure: confidences and the margin at or above it, "
        "entropies at or below it. Unset: the model's calibration, else the signal's default",
    )
    window: int = Field(DEFAULT_WINDOW, ge=1, le=32_768, description="tokens in DeepConf's group-confidence window")
    progress: bool = Field(False, description="streaming: send the decision as a progress chunk before the answer")


class AutoLimits(PolicyLimits):
    window: int | None = 4096
