"""Per-key budgets: requests per minute and engine tokens per minute, for an API key entry that sets them.

Each budget is a bucket that holds a minute's worth and refills continuously. A request is admitted while
both of its key's buckets have something left; it takes one request at once, and the prompt and completion
tokens of every engine call it made (from usage, `EngineClient.engine_tokens`) when it ends, so a bucket may
go below zero and the key then waits until the refill has paid the debt. Over budget is a 429 with
Retry-After: when the bucket will have room again. Metrics carry the key's name, never its secret.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from refine_server.errors import APIError


class KeyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("refine_key_requests", "Requests admitted, by API key name", ["key"], registry=registry)
        self.tokens = Counter(
            "refine_key_engine_tokens",
            "Engine tokens (prompt and completion, every engine call) of requests, by API key name",
            ["key"],
            registry=registry,
        )
        self.rejected = Counter(
            "refine_key_rejections",
            "Requests refused for a spent budget, by API key name and budget (requests_per_minute, tokens_per_minute)",
            ["key", "budget"],
            registry=registry,
        )


class Bucket:
    """`per_minute` units a minute, refilled continuously, holding at most a minute's worth."""

    def __init__(self, per_minute: int, clock: Callable[[], float]):
        self._rate_s = per_minute / 60.0
        self._capacity = float(per_minute)
        self._level = float(per_minute)
        self._clock = clock
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self._capacity, self._level + (now - self._at) * self._rate_s)
        self._at = now
        return self._level

    def take(self, units: float) -> None:
        self._level = self.level() - units

    def seconds_until(self, units: float) -> float:
        """How long until the bucket holds `units`."""
        return max(0.0, (units - self.level()) / self._rate_s)


class KeyBudget:
    """One key's budgets (either may be None: no budget) and its metrics."""

    def __init__(
        self,
        name: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        metrics: KeyMetrics,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self._requests = Bucket(requests_per_minute, clock) if requests_per_minute else None
        self._tokens = Bucket(tokens_per_minute, clock) if tokens_per_minute else None
        self._admitted = metrics.requests.labels(name)
        self._spent = metrics.tokens.labels(name)
        self._rejected = metrics.rejected

    @property
    def counts_tokens(self) -> bool:
        return self._tokens is not None

    def admit(self) -> None:
        """Take one request from the key's budget, or a 429 with Retry-After when a budget is spent."""
        for budget, bucket, need in (
            ("requests_per_minute", self._requests, 1.0),
            ("tokens_per_minute", self._tokens, 1.0),
        ):
            if bucket is not None and bucket.level() < need:
                self._rejected.labels(self.name, budget).inc()
                wait = max(1, math.ceil(bucket.seconds_until(need)))
                raise APIError(
                    429,
                    f"this API key's {budget} budget is spent; retry after {wait} s",
                    code="key_budget_exceeded",
                    headers={"Retry-After": str(wait)},
                )
        if self._requests is not None:
            self._requests.take(1)
        self._admitted.inc()

    def charge_tokens(self, tokens: int) -> None:
        """What a finished request's engine calls cost."""
        self._spent.inc(tokens)
        if self._tokens is not None:
            self._tokens.take(tokens)
