"""Per-key budgets on a clock the test moves: requests and engine tokens per minute, 429s with Retry-After,
metrics by the key's name."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from refine_server.errors import APIError
from refine_server.gatekeeping.key_budgets import KeyBudget, KeyMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _budget(rpm: int | None = None, tpm: int | None = None) -> tuple[KeyBudget, Clock, CollectorRegistry]:
    clock, registry = Clock(), CollectorRegistry()
    return KeyBudget("team-a", rpm, tpm, KeyMetrics(registry), clock), clock, registry


def test_requests_per_minute_then_a_429_with_retry_after_until_the_bucket_refills() -> None:
    budget, clock, registry = _budget(rpm=2)
    budget.admit()
    budget.admit()
    with pytest.raises(APIError) as err:
        budget.admit()
    assert err.value.status == 429 and err.value.code == "key_budget_exceeded"
    assert err.value.headers == {"Retry-After": "30"}  # one request comes back every 30 s
    assert "requests_per_minute" in err.value.message
    clock.now += 30
    budget.admit()
    assert registry.get_sample_value("refine_key_requests_total", {"key": "team-a"}) == 3
    assert (
        registry.get_sample_value("refine_key_rejections_total", {"key": "team-a", "budget": "requests_per_minute"})
        == 1
    )


def test_engine_tokens_are_charged_when_a_request_ends_and_a_key_in_debt_waits() -> None:
    budget, clock, registry = _budget(tpm=600)  # 10 tokens a second
    budget.admit()
    budget.charge_tokens(900)  # one request spent more than the minute's budget: 300 in debt
    with pytest.raises(APIError) as err:
        budget.admit()
    assert err.value.headers == {"Retry-After": "31"}  # (300 + 1) tokens at 10 a second
    assert "tokens_per_minute" in err.value.message
    clock.now += 31
    budget.admit()
    assert registry.get_sample_value("refine_key_engine_tokens_total", {"key": "team-a"}) == 900


def test_a_bucket_holds_at_most_a_minutes_worth() -> None:
    budget, clock, _ = _budget(rpm=2)
    clock.now += 3600  # an idle hour does not save up an hour of requests
    budget.admit()
    budget.admit()
    with pytest.raises(APIError):
        budget.admit()


def test_a_key_without_budgets_is_only_counted() -> None:
    budget, _, registry = _budget()
    for _ in range(100):
        budget.admit()
    budget.charge_tokens(10**6)
    budget.admit()
    assert not budget.counts_tokens
    assert registry.get_sample_value("refine_key_requests_total", {"key": "team-a"}) == 101
