"""policies.rain.search: token sets, the self-evaluation prompts, and the search against a scripted engine (no vLLM)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import numpy as np
import pytest

from refine_server.policies.engine_client import Budget, BudgetExhausted, Spend
from refine_server.policies.rain.policy import RainParams
from refine_server.policies.rain.search import (
    ANSWER_LINE,
    RainSearch,
    SelfEvaluator,
    distinct_sets,
    load_criterion,
)
from refine_server.policies.rain.tree import TokenSet

# ---- token sets ------------------------------------------------------------------------------------------------------


def test_greedy_set_probability_is_clamped_into_the_samples_range() -> None:
    greedy = TokenSet((1, 2), 0.9, greedy=True)
    samples = [TokenSet((3, 4), 0.05), TokenSet((1, 2), 0.9), TokenSet((5, 6), 0.01), TokenSet((3, 4), 0.05)]
    sets = distinct_sets(greedy, samples)
    assert [s.tokens for s in sets] == [(1, 2), (3, 4), (5, 6)]
    assert sets[0].greedy and sets[0].probability == pytest.approx(0.06)  # min(0.9, sum=0.06), >= 0.05+0.01


# ---- the criteria's prompts ------------------------------------------------------------------------------------------


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

    model = "scripted"

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

    async def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        """The judge's tokenizer: a judge prompt becomes [0] if its response is rejected, else [1]."""
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

    async def expansion_sets(self, prompt, length, top_k, samples, together) -> tuple[TokenSet, list[TokenSet]]:
        return await self.greedy_set(prompt, length, top_k), await self.sampled_sets(prompt, length, top_k, samples)

    async def rollout(self, prompt, max_tokens, *, to_end=False) -> list[int]:
        self._call("rollout")
        return [99]

    async def judge(self, prompts, options, model) -> list[tuple[float, float]]:
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
    criterion = load_criterion(p.criterion, p.question)
    evaluator = SelfEvaluator(engine, engine, criterion, "question?", (65, 66))
    return RainSearch(engine, evaluator, criterion, DistinctEmbedder(), p, prompt=[100, 101], max_tokens=max_tokens)


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
        async def judge(self, prompts, options, model):
            await asyncio.sleep(0.2)
            return await super().judge(prompts, options, model)

    search = _search(SlowEngine(budget=Budget(None, None, seconds=0.5)), max_iterations_per_commit=50)
    started = time.monotonic()
    await search.commit_next()
    assert search.budget_exhausted == "max_seconds"
    assert time.monotonic() - started < 3.0  # unbounded, its 50 iterations would take 10 s


async def test_parallel_leaves_search_distinct_leaves_concurrently() -> None:
    class CountingEngine(ScriptedEngine):
        in_flight = most_in_flight = 0

        async def rollout(self, prompt, max_tokens, *, to_end=False):
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


# ---- deferred expansion ----------------------------------------------------------------------------------------------


class SeededEngine(ScriptedEngine):
    """Every answer is a pseudo-random function of a fixed seed and the question asked (the prompt, or the text
    judged), never of the order of the questions: two searches that ask the same things get the same answers.
    Its judge gives every value, -1, 0 and 1, so the values steer the search."""

    def __init__(self, seed: int = 7):
        super().__init__()
        self.seed = seed
        self.judged: list[str] = []  # the judge prompts, by id

    def _rng(self, *key: Any) -> random.Random:
        return random.Random(f"{self.seed}|{key}")

    async def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        self.judged.append(text)
        return [len(self.judged) - 1]

    async def top_tokens(self, prompt, k) -> list[TokenSet]:
        self._call("expand")
        rng = self._rng("top", tuple(prompt))
        tokens = rng.sample(range(1, 60), k)
        weights = sorted((rng.random() for _ in range(k)), reverse=True)
        return [TokenSet((t,), w / sum(weights), greedy=i == 0) for i, (t, w) in enumerate(zip(tokens, weights))]

    async def greedy_set(self, prompt, length, top_k) -> TokenSet:
        self._call("expand")
        rng = self._rng("greedy", tuple(prompt), length)
        return TokenSet(tuple(rng.randrange(1, 60) for _ in range(length)), rng.random(), greedy=True)

    async def sampled_sets(self, prompt, length, top_k, n, purpose="expand") -> list[TokenSet]:
        self._call(purpose)
        rng = self._rng("sampled", tuple(prompt), length, n)
        return [TokenSet(tuple(rng.randrange(1, 4) for _ in range(length)), rng.random() / 10) for _ in range(n)]

    async def rollout(self, prompt, max_tokens, *, to_end=False) -> list[int]:
        self._call("rollout")
        rng = self._rng("rollout", tuple(prompt))
        return [rng.randrange(60, 90) for _ in range(rng.randrange(1, 4))][:max_tokens]

    async def judge(self, prompts, options, model) -> list[tuple[float, float]]:
        self._call("evaluate")
        rngs = [self._rng("judge", self.judged[p[0]]) for p in prompts]
        return [(-rng.random(), -rng.random()) for rng in rngs]


def _search_record(record) -> tuple:
    """What a commit decided, and the statistics it decided on."""
    return (
        record.tokens,
        record.iterations,
        record.rewinds,
        record.stopped,
        [(c["tokens"], c["true_visits"], c["visits"], c["q"], c["prior"]) for c in record.children],
    )


async def test_deferred_expansion_makes_the_same_visits_and_choices_as_eager_expansion() -> None:
    records, expansions = {}, {}
    for defer in (True, False):
        engine = SeededEngine()
        search = _search(
            engine,
            max_tokens=17,
            defer_expansion=defer,
            judge_guard=False,
            max_iterations_per_commit=25,
            min_iterations_per_commit=10,
        )
        records[defer] = []
        while not search.done:
            records[defer].append(_search_record(await search.commit_next()))
        expansions[defer] = engine.spend.cost("expand").calls
    assert [len(r[0]) for r in records[True]] == [1, 2, 4, 10]
    assert any(-1.0 < child[3] < 1.0 and child[3] != 0 for r in records[True] for child in r[4])  # values steer
    assert records[True] == records[False]
    assert expansions[True] < expansions[False]  # leaves visited once were never expanded


# ---- the judge guard -------------------------------------------------------------------------------------------------


class PositionJudgeEngine(ScriptedEngine):
    """A judge that prefers option B whatever the order: every value is 0, as the bundled 135M model's."""

    async def judge(self, prompts, options, model) -> list[tuple[float, float]]:
        self._call("evaluate")
        return [(-2.0, -1.0), (-2.0, -1.0)]


async def test_the_judge_guard_commits_when_the_first_evaluations_are_all_position_answers() -> None:
    search = _search(PositionJudgeEngine(), max_tokens=40, max_iterations_per_commit=20)
    record = await search.commit_next()
    assert record.stopped == "no_signal" and record.iterations == 4
    judged = record.judge.as_dict()
    assert judged["values"] == {"-1": 0, "0": 4, "1": 0} and judged["orders_agree"] == 0
    assert judged["same_letter_both_orders"] == {"A": 0, "B": 4}
    most_visited = max(record.children, key=lambda c: (c["visits"], c["q"]))
    assert record.tokens == tuple(most_visited["tokens"])
    # Paper-exact: the guard off, every planned iteration runs.
    search = _search(PositionJudgeEngine(), max_tokens=40, max_iterations_per_commit=20, judge_guard=False)
    record = await search.commit_next()
    assert record.stopped == "iterations" and record.iterations == 20


async def test_the_judge_guard_keeps_its_evidence_for_the_request() -> None:
    """After k position answers in a row a later commit waits for one more, not k; a judge that gave a signal
    once gets the full count again at every commit."""
    search = _search(PositionJudgeEngine(), max_tokens=40, max_iterations_per_commit=20)
    first, second, third = [await search.commit_next() for _ in range(3)]
    assert [(r.stopped, r.iterations) for r in (first, second, third)] == [
        ("no_signal", 4),
        ("no_signal", 1),
        ("no_signal", 1),
    ]

    search = _search(SignalOnceEngine(), max_tokens=40, max_iterations_per_commit=20)
    first, second = await search.commit_next(), await search.commit_next()
    assert first.judge.values[0] == -1 and (first.stopped, first.iterations) == ("iterations", 20)
    assert (second.stopped, second.iterations) == ("no_signal", 4)


class SignalOnceEngine(PositionJudgeEngine):
    """Its first self-evaluation rejects the text in both orders (-1); every later one answers by position (0)."""

    judged = 0

    async def judge(self, prompts, options, model) -> list[tuple[float, float]]:
        self.judged += 1
        if self.judged == 1:
            self._call("evaluate")
            return [(-2.0, -1.0), (-1.0, -2.0)]
        return await super().judge(prompts, options, model)


async def test_the_judge_guard_leaves_a_judge_that_agrees_across_orders_alone() -> None:
    search = _search(
        ScriptedEngine(rejected="t1"), max_tokens=40, max_iterations_per_commit=20, judge_guard_evaluations=2
    )
    record = await search.commit_next()
    assert record.stopped != "no_signal" and record.iterations > 2
    assert record.judge.as_dict()["orders_agree"] == len(record.judge.values)


# ---- fixed deviations from the official code -------------------------------------------------------------------------


class RecordingEngine(ScriptedEngine):
    """Token 98's text is "." ; records the rollouts asked for and the responses judged."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[tuple[int, bool]] = []
        self.responses: list[str] = []
        self.widen_lengths: list[int] = []

    async def text(self, tokens) -> str:
        return " ".join("." if t == 98 else f"t{t}" for t in tokens)

    async def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        self.responses.append(
            re.search(r"(?:Assistant|A): (.*)\n", text.rsplit("Options:", 1)[0].split("\n\n")[-1]).group(1)
        )
        return [1]

    async def rollout(self, prompt, max_tokens, *, to_end=False) -> list[int]:
        self._call("rollout")
        self.rollouts.append((max_tokens, to_end))
        return [5, 98, 6]

    async def sampled_sets(self, prompt, length, top_k, n, purpose="expand") -> list[TokenSet]:
        if purpose == "widen":
            self.widen_lengths.append(length)
        return await super().sampled_sets(prompt, length, top_k, n, purpose)


async def test_the_empty_response_is_judged_without_a_rollout() -> None:
    engine = RecordingEngine()
    search = _search(engine, max_tokens=40)
    await search._search_round(1)  # the first iteration: the root, nothing answered yet
    assert engine.rollouts == [] and engine.responses == ["", ""]  # both option orders


async def test_truthful_rolls_out_to_the_end_and_judges_up_to_the_last_period() -> None:
    engine = RecordingEngine()
    search = _search(engine, max_tokens=40, criterion="truthful")
    await search.commit_next()
    assert engine.rollouts and all(to_end for _, to_end in engine.rollouts)
    assert engine.rollouts[0][0] == 40 - 1  # the rest of the answer after the first token
    rolled_out = [r for r in engine.responses if "t5" in r]
    assert rolled_out and all(r.endswith("t5 .") for r in rolled_out)  # "... t5 . t6" is judged as "... t5 ."


async def test_widening_samples_a_set_of_the_levels_length_even_after_a_child_that_ended_early() -> None:
    engine = RecordingEngine()
    search = _search(engine, max_tokens=40, set_lengths=[4])
    tree = search.tree
    tree.expand(tree.root, [TokenSet((7,), 0.5, ends_answer=True), TokenSet((8, 8, 8, 8), 0.5)])
    tree.backup(tree.root.children[0], -1.0, [np.array([1.0, 0.0])])
    tree.backup(tree.root.children[1], -1.0, [np.array([1.0, 0.01])])
    await search._select_leaf()
    assert engine.widen_lengths == [4]
