"""Who may call refine, and what each API key may do: the policies it may use, its own caps on them, its
budgets (key_budgets.py) and its own engine priorities."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from fastapi import Request

from refine_server.config import APIKey
from refine_server.errors import APIError
from refine_server.gatekeeping.key_budgets import KeyBudget, KeyMetrics
from refine_server.policies import PolicyLimits, PolicyRegistry

OPEN_KEY_NAME = "open"  # the caller's name in admission's queues when no keys are configured


@dataclass(frozen=True)
class Grant:
    """What one authenticated caller may do. The open grant (no keys configured) allows everything."""

    policies: frozenset[str] | None = None  # None: every policy
    limits: dict[str, PolicyLimits] = field(default_factory=dict)
    name: str = OPEN_KEY_NAME  # the key's name, for metrics and for taking turns in admission's queues
    budget: KeyBudget | None = field(default=None, compare=False)  # None: the open grant
    priorities: dict[str, int] = field(default_factory=dict)  # the key's own engine priority per policy

    def check_policy(self, name: str) -> None:
        if self.policies is not None and name not in self.policies:
            raise APIError(
                403,
                f"policy {name!r} is not allowed for this API key",
                param="refine.policy",
                code="policy_not_allowed",
            )


class KeyRing:
    """The accepted keys, each with its grant; built and checked once, at start-up."""

    def __init__(self, keys: list[APIKey], registry: PolicyRegistry, metrics: KeyMetrics):
        self._keys: list[tuple[bytes, Grant]] = []
        names: set[str] = set()
        for number, entry in enumerate(keys, 1):
            for name in [*(entry.policies or ()), *entry.policy_priority]:
                registry.get(name)  # an unknown policy name fails at start-up
            key_name = entry.name or f"key-{number}"
            if key_name in names:
                raise ValueError(f"api_keys: two keys are named {key_name!r}")
            names.add(key_name)
            budget = KeyBudget(key_name, entry.requests_per_minute, entry.tokens_per_minute, metrics)
            grant = Grant(
                frozenset(entry.policies) if entry.policies is not None else None,
                registry.parse_limits(entry.policy_limits, only_given=True),
                key_name,
                budget,
                dict(entry.policy_priority),
            )
            self._keys.append((entry.key.get_secret_value().encode(), grant))

    def authenticate(self, request: Request) -> Grant:
        if not self._keys:
            return Grant()
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Anthropic's clients send their key as `x-api-key`; it is taken as a Bearer key is.
        given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").strip()
        presented = given.encode()
        # Compare against every key, in constant time each, so timing tells nothing about which matched.
        matched: Grant | None = None
        for key, grant in self._keys:
            if secrets.compare_digest(presented, key) and matched is None:
                matched = grant
        if matched is None:
            raise APIError(
                401,
                "invalid or missing API key (send it as 'Authorization: Bearer KEY' or 'x-api-key')",
                code="invalid_api_key",
            )
        return matched
