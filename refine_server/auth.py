"""Who may call refine, and what each API key may do: the policies it may use and its own caps on them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from fastapi import Request

from refine_server.config import APIKey
from refine_server.errors import APIError
from refine_server.policies import PolicyLimits, PolicyRegistry


@dataclass(frozen=True)
class Grant:
    """What one authenticated caller may do. The open grant (no keys configured) allows everything."""

    policies: frozenset[str] | None = None  # None: every policy
    limits: dict[str, PolicyLimits] = field(default_factory=dict)

    def check_policy(self, name: str) -> None:
        if self.policies is not None and name not in self.policies:
            raise APIError(403, f"policy {name!r} is not allowed for this API key", param="refine.policy",
                           code="policy_not_allowed")


class KeyRing:
    """The accepted keys, each with its grant; built and checked once, at start-up."""

    def __init__(self, keys: list[APIKey], registry: PolicyRegistry):
        self._keys: list[tuple[bytes, Grant]] = []
        for entry in keys:
            if entry.policies is not None:
                for name in entry.policies:
                    registry.get(name)  # an unknown policy name fails at start-up
            grant = Grant(frozenset(entry.policies) if entry.policies is not None else None,
                          registry.parse_limits(entry.policy_limits, only_given=True))
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
            raise APIError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY' or 'x-api-key')",
                           code="invalid_api_key")
        return matched
