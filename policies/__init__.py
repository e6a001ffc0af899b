"""refine's self-correction policies and the registry the server looks them up in.

To add a policy: write one module here with a `Policy` subclass, and list it in `BUILTIN_POLICIES`.
The server needs no edit: it validates `{"refine": {"policy": NAME, ...}}` against the policy's `Params`,
and creates and observes the metrics the policy declares in `metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from refine_server.policies.auto import AutoPolicy
from refine_server.policies.base import (
    LimitExceeded,
    Policy,
    PolicyError,
    PolicyLimits,
    PolicyMetric,
    PolicyParams,
    PolicyRequestError,
    PolicyUnavailable,
    enforce_limits,
)
from refine_server.policies.cyberv import CyberVPolicy
from refine_server.policies.deepconf import DeepConfPolicy
from refine_server.policies.none import NonePolicy
from refine_server.policies.rain import RainPolicy
from refine_server.policies.srgen import SRGenPolicy

BUILTIN_POLICIES: tuple[type[Policy[Any]], ...] = (
    NonePolicy,
    SRGenPolicy,
    CyberVPolicy,
    RainPolicy,
    DeepConfPolicy,
    AutoPolicy,
)


class UnknownPolicy(KeyError):
    pass


class PolicyRegistry:
    """The policies a server offers, each with the limits its configuration sets."""

    def __init__(
        self,
        policies: Iterable[type[Policy[Any]]],
        limits: Mapping[str, Mapping[str, Any]] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        """`options`: keyword arguments of a policy's constructor, by policy name, from the server's settings
        (`auto`'s calibration file)."""
        options = options or {}
        self._policies = {p.name: p(**options.get(p.name, {})) for p in policies}
        limits = dict(limits or {})
        # Bad limits fail at start-up, not on the first request that uses them.
        parsed = self.parse_limits(limits)
        self._limits: dict[str, PolicyLimits] = {
            name: parsed.get(name) or policy.Limits() for name, policy in self._policies.items()
        }

    @property
    def names(self) -> list[str]:
        return sorted(self._policies)

    def get(self, name: str) -> Policy[Any]:
        try:
            return self._policies[name]
        except KeyError:
            raise UnknownPolicy(name) from None

    def metrics(self) -> dict[str, tuple[PolicyMetric, ...]]:
        """The metrics each policy declares, by policy name."""
        return {name: policy.metrics for name, policy in self._policies.items()}

    def limits(self, name: str) -> PolicyLimits:
        return self._limits[name]

    def parse_limits(
        self, limits: Mapping[str, Mapping[str, Any]], *, only_given: bool = False
    ) -> dict[str, PolicyLimits]:
        """Caps by policy name, validated against each policy's `Limits`. Raises ValueError or ValidationError.

        `only_given`: a cap not named is no cap (for an API key's caps, which add to the server's), instead
        of the policy's default cap.
        """
        unknown = set(limits) - set(self._policies)
        if unknown:
            raise ValueError(f"limits given for unknown policies: {sorted(unknown)}")
        parsed = {name: self._policies[name].Limits.model_validate(dict(caps)) for name, caps in limits.items()}
        if only_given:
            parsed = {
                name: caps.model_copy(
                    update={f: None for f in type(caps).model_fields if f not in caps.model_fields_set}
                )
                for name, caps in parsed.items()
            }
        return parsed

    def resolve(
        self, name: str, raw_params: Mapping[str, Any], extra_limits: Mapping[str, PolicyLimits] | None = None
    ) -> tuple[Policy[Any], PolicyParams]:
        """The policy and its validated parameters, within the server's caps and `extra_limits` (an API key's).

        Raises UnknownPolicy, ValidationError or LimitExceeded.
        """
        policy = self.get(name)
        params = policy.Params.model_validate(dict(raw_params))
        own = (extra_limits or {}).get(name)
        enforce_limits(params, self._limits[name], *([own] if own else []))
        return policy, params


__all__ = [
    "BUILTIN_POLICIES",
    "LimitExceeded",
    "Policy",
    "PolicyError",
    "PolicyLimits",
    "PolicyMetric",
    "PolicyParams",
    "PolicyRegistry",
    "PolicyRequestError",
    "PolicyUnavailable",
    "UnknownPolicy",
]
