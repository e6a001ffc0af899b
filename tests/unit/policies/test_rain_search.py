"""policies.rain_search: token sets, the self-evaluation prompts, and the search against a scripted engine (no vLLM)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import numpy as np
import pytest

from refine_server.policies.engine_client import Budget, BudgetExhausted, Spend
from refine_server.policies.rain import RainParams
from refine_server.policies.rain_search import (
    ANSWER_LINE,
    RainSearch,
    SelfEvaluator,
    distinct_sets,
    load_criterion,
)
from refine_server.policies.rain_tree import TokenSet


# ---- token sets --------------------------------------------------------------------------------------------------------

def test_greedy_set_probability_is_clamped_into_the_samples_range() -> None:
    greedy = TokenSet((1, 2), 0.9, greedy=True)
    samples = [TokenSet((3, 4), 0.05), TokenSet((1, 2), 0.9), TokenSet((5, 6), 0.01), TokenSet((3, 4), 0.05)]
    sets = distinct_sets(greedy, samples)
    assert [s.tokens for s in sets] == [(1, 2), (3, 4), (5, 6)]
    assert sets[0].greedy and sets[0].probability == pytest.approx(0.06)  # min(0.9, sum=0.06), >= 0.05+0.01


# ---- the criteria's prompts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["harmless", "truthful", "custom"])
def test_each_criterion_asks_both_option_orders_and_ends_at_the_answer_line(name: str) -> None:
    criterion = load_criterion(name, "Is it {polite}?" if name == "custom" else None)
    first = criterion.prompt("Q?", "R so far", acceptable_first=True)
    second = criterion.prompt("Q?", "R so far", acceptable_first=False)
    for prompt in (first, second):
        assert prompt.endswith(ANSWER_LINE) and "Q?" in prompt and "R so far" in prompt
    tail = first.rsplit("Options:", 1)[1]
    assert tail.index(criterion.acceptable) < tail.index(criterion.unacceptable)
    tail = second.rsplit("Options:", 1)[1]
    assert tail.index(criterion.unacceptable) < tail.index(criterion.acceptable)
    if name == "custom":
        assert "Is it {polite}?" in first  # the caller's braces are text, not template fields


# ---- the search against a scripted engine --------------------------------------------------------------

class ScriptedEngine:
    """A toy model over integer tokens whose text is "t<id>" per token. Its next-token distribution always
    ranks token 1 first (the greedy choice), then 2, 3, ...; its judge rejects any response containing
    `rejected`. Counts engine calls against the budget like the real one."""

    def __init__(self, rejected: str | None = None, budget: Budget | None = None):
        self.rejected = rejected
        self.budget = budget or Budget(None, None, None)
        self.spend = Spend()

    def _call(self, purpose: str) -> None:
        b = self.budget
        if b.engine_calls is not None and self.spend.engine_calls >= b.engine_calls:
            raise BudgetExhausted("max_engine_calls")
        self.spend.cost(purpose).calls += 1

    async def text(self, tokens) -> str:
        return " ".join(f"t{t}" for t in tokens)

    async def tokenize(self, text: str, *, special_tokens: bool = False) -> list[int]:
        response = text.rsplit("Options:", 1)[0]
        return [0 if self.rejected and re.search(rf"\b{self.rejected}\b", response) else 1]

    async def top_tokens(self, prompt, k) -> list[TokenSet]:
        self._call("expand")
        weights = [1 / (i + 1) for i in range(k)]
        return [TokenSet((i + 1,), w / sum(weights), greedy=i == 0) for i, w in enumerate(weights)]

    async def greedy_set(self, prompt, length, top_k) -> TokenSet:
        self._call("expand")
        return TokenSet(tuple([1] * length), 0.5, greedy=True)

    async def sampled_sets(self, prompt, length, top_k, n, purpose="expand") -> list[TokenSet]:
        self._call(purpose)
        return [TokenSet(tuple([i + 2] * length), 0.1) for i in range(n)]

    async def rollout(self, prompt, max_tokens) -> list[int]:
        self._call("rollout")
        return [99]

    async def judge(self, prompts, options) -> list[tuple[float, float]]:
        """The prompt "ids" are [0] for a rejected response, [1] otherwise; option A comes first in the first
        prompt (acceptable first) and second in the other."""
        self._call("evaluate")
        bad = prompts[0] == [0]
        return [(-2.0, -1.0) if bad else (-1.0, -2.0), (-1.0, -2.0) if bad else (-2.0, -1.0)]


class DistinctEmbedder:
    """Every distinct text gets its own direction: no two texts are similar, so no values are shared."""

    def __init__(self) -> None:
        self.directions: dict[str, int] = {}

    async def embed(self, texts):
        rows = np.zeros((len(texts), 1024))
        for row, text in enumerate(texts):
            rows[row, self.directions.setdefault(text, len(self.directions))] = 1.0
        return rows


def _search(engine: ScriptedEngine, max_tokens: int = 6, **params: Any) -> RainSearch:
    p = RainParams(**params)
    evaluator = SelfEvaluator(engine, load_criterion(p.criterion, p.question), "question?", (65, 66))
    return RainSearch(engine, evaluator, DistinctEmbedder(), p, prompt=[100, 101], max_tokens=max_tokens)


async def test_without_a_rejection_the_search_commits_the_greedy_token() -> None:
    search = _search(ScriptedEngine(), max_iterations_per_commit=15)
    record = await search.commit_next()
    assert record.greedy and record.tokens == (1,) and search.answer == [1]
    # Every response is judged acceptable: the commit comes early, once the best child has 7 visits.
    assert record.stopped == "confident" and record.iterations < 15


async def test_a_rejected_greedy_token_is_searched_around_and_not_committed() -> None:
    search = _search(ScriptedEngine(rejected="t1"), max_iterations_per_commit=20)
    record = await search.commit_next()
    greedy = next(c for c in record.children if c["greedy"])
    assert greedy["q"] == -1.0
    assert not record.greedy and record.tokens != (1,)
    assert record.rewinds > 0
    # Later commits keep going from the committed prefix with longer sets.
    second = await search.commit_next()
    assert len(second.tokens) == 2 and search.answer[:1] == list(record.tokens)


async def test_an_exhausted_budget_commits_the_best_child_and_stops_the_search() -> None:
    engine = ScriptedEngine(budget=Budget(engine_calls=7, tokens=None, seconds=None))
    search = _search(engine, max_iterations_per_commit=50)
    record = await search.commit_next()
    assert record is not None and record.stopped == "max_engine_calls"
    assert search.budget_exhausted == "max_engine_calls" and search.done
    assert engine.spend.engine_calls <= 7


async def test_a_budget_gone_before_the_first_expansion_commits_nothing() -> None:
    search = _search(ScriptedEngine(budget=Budget(engine_calls=0, tokens=None, seconds=None)))
    assert await search.commit_next() is None
    assert search.budget_exhausted == "max_engine_calls"


async def test_the_wall_time_budget_stops_a_slow_search() -> None:
    class SlowEngine(ScriptedEngine):
        async def rollout(self, prompt, max_tokens):
            await asyncio.sleep(0.2)
            return await super().rollout(prompt, max_tokens)

    search = _search(SlowEngine(budget=Budget(None, None, seconds=0.5)), max_iterations_per_commit=50)
    started = time.monotonic()
    await search.commit_next()
    assert search.budget_exhausted == "max_seconds"
    assert time.monotonic() - started < 3.0  # unbounded, its 50 iterations would take 10 s


async def test_parallel_leaves_search_distinct_leaves_concurrently() -> None:
    class CountingEngine(ScriptedEngine):
        in_flight = most_in_flight = 0

        async def rollout(self, prompt, max_tokens):
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1
            return [99, len(prompt)]  # a distinct text per leaf, so no evaluation comes from the cache

    engine = CountingEngine(rejected="t1")
    search = _search(engine, max_tokens=40, max_iterations_per_commit=16, parallel_leaves=4)
    root = search.tree.root
    record = await search.commit_next()
    assert engine.most_in_flight == 4
    assert record.iterations >= 8 and not record.greedy  # still finds its way around the rejected greedy token
    # Every iteration is one evaluated leaf: the root's visits count them all.
    assert root.true_visits == record.iterations


async def test_the_answer_ends_at_max_tokens_with_sets_cut_to_fit() -> None:
    search = _search(ScriptedEngine(), max_tokens=4, max_iterations_per_commit=15)
    lengths = []
    while not search.done:
        lengths.append(len((await search.commit_next()).tokens))
    assert lengths == [1, 2, 1] and len(search.answer) == 4
