"""The one client policies call vLLM through: model and seed on every call, cost by purpose, budgets."""

from __future__ import annotations

from typing import Any

import pytest

from refine_server.policies.engine_client import Budget, BudgetExhausted
from tests.conftest import policy_call


class RecordingBackend:
    """Answers every call with `completion_tokens` tokens and remembers what it was sent."""

    def __init__(self, completion_tokens: int = 3):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.completion_tokens = completion_tokens

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        self.calls.append((path, body))
        return {
            "choices": [],
            "usage": {
                "prompt_tokens": 2,
                "completion_tokens": self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 1},
            },
        }


async def test_every_call_carries_the_clients_model_and_seed_unless_it_sets_its_own() -> None:
    backend = RecordingBackend()
    engine = policy_call("completions", {"model": "m", "prompt": "q", "seed": 7}, backend).engine
    await engine.chat("a", [{"role": "user", "content": "x"}])
    await engine.completions("b", [1, 2], seed=99)
    assert [(path, body["model"], body["seed"]) for path, body in backend.calls] == [
        ("/v1/chat/completions", "m", 7),
        ("/v1/completions", "m", 99),
    ]


async def test_cost_is_counted_by_purpose_and_summed_into_the_usage() -> None:
    engine = policy_call("completions", {"model": "m", "prompt": "q"}, RecordingBackend()).engine
    await engine.completions("expand", [1])
    await engine.completions("expand", [1])
    await engine.completions("judge", [[1], [2, 3]])
    assert {p: (c.calls, c.completion_tokens) for p, c in engine.spend.by_purpose.items()} == {
        "expand": (2, 6),
        "judge": (1, 3),
    }
    assert engine.usage() == {
        "prompt_tokens": 6,
        "completion_tokens": 9,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


@pytest.mark.parametrize(
    "budget, calls_allowed, name",
    [
        (Budget(engine_calls=2, tokens=None, seconds=None), 2, "max_engine_calls"),
        (Budget(engine_calls=None, tokens=7, seconds=None), 3, "max_search_tokens"),  # 3 + 3 + 3 >= 7 after three
        (Budget(engine_calls=None, tokens=None, seconds=0.0), 0, "max_seconds"),
    ],
)
async def test_a_budget_stops_the_next_call_once_spent(budget: Budget, calls_allowed: int, name: str) -> None:
    backend = RecordingBackend(completion_tokens=3)
    engine = policy_call("completions", {"model": "m", "prompt": "q"}, backend).engine
    engine.budget = budget
    with pytest.raises(BudgetExhausted) as err:
        for _ in range(10):
            await engine.completions("step", [1])
    assert err.value.budget == name and len(backend.calls) == calls_allowed
