"""Parameter models every policy uses: per-request parameters and the server's caps on them.

They live on the engine side of refine because in-engine policies validate their parameters in vLLM too
(defence in depth), and this module imports nothing but pydantic: the proxy and the engine share it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


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
