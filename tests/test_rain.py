"""rain: the tree's rules on hand-made nodes, the search against a scripted engine (no vLLM), and, marked
`engine`, the policy on the real model through the official openai client."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from refine_server.policies import LimitExceeded, PolicyRegistry
from refine_server.policies.engine_client import Budget, BudgetExhausted, Spend
from refine_server.policies.rain import RainParams, RainPolicy
from refine_server.policies.rain_embeddings import _encode
from refine_server.policies.rain_search import (
    ANSWER_LINE,
    RainSearch,
    SelfEvaluator,
    distinct_sets,
    load_criterion,
)
from refine_server.policies.rain_tree import SearchTree, TokenSet, TreeSettings

from tests.conftest import MODEL, metric_total

# ---- the tree ------------------------------------------------------------------------------------------


def _tree_with_children(probabilities: list[float]) -> SearchTree:
    tree = SearchTree(TreeSettings())
    tree.expand(tree.root, [TokenSet((i,), p) for i, p in enumerate(probabilities)])
    return tree


def test_root_priors_are_normalised_then_smoothed_towards_uniform() -> None:
    tree = _tree_with_children([0.6, 0.2, 0.2])
    priors = [c.prior for c in tree.root.children]
    assert priors == pytest.approx([0.75 * 0.6 + 0.25 / 3, 0.75 * 0.2 + 0.25 / 3, 0.75 * 0.2 + 0.25 / 3])
    assert sum(priors) == pytest.approx(1.0)
    grandchildren = [TokenSet((7,), 0.3), TokenSet((8,), 0.1)]
    tree.expand(tree.root.children[0], grandchildren)
    assert [c.prior for c in tree.root.children[0].children] == pytest.approx([0.75, 0.25])  # no smoothing


def test_selection_explores_by_prior_first_then_exploits_value() -> None:
    tree = _tree_with_children([0.7, 0.3])
    tree.root.visits = 1
    assert tree.select_child(tree.root).tokens == (0,)  # unvisited: the prior decides
    likely, unlikely = tree.root.children
    tree.backup(likely, -1.0, [np.array([1.0, 0.0])])
    tree.backup(unlikely, 1.0, [np.array([0.0, 1.0])])
    # q_hat = (q + 1) / 2 over the [-1, 1] range: the judged-good child wins despite its smaller prior.
    assert tree.score(unlikely) > tree.score(likely)
    assert tree.select_child(tree.root) is unlikely


def test_backup_updates_every_node_on_the_path_and_the_root() -> None:
    tree = _tree_with_children([0.5, 0.5])
    child = tree.root.children[0]
    tree.expand(child, [TokenSet((5, 6), 1.0)])
    leaf = child.children[0]
    tree.backup(leaf, 1.0, [np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    tree.backup(leaf, 0.0, [np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    for node in (tree.root, child, leaf):
        assert node.true_visits == 2 and node.visits == 2
        assert node.q == pytest.approx(0.5)
    assert tree.root.children[1].visits == 0


def test_near_identical_siblings_share_the_value_weighted_by_similarity() -> None:
    tree = _tree_with_children([0.5, 0.3, 0.2])
    a, b, c = tree.root.children
    tree.backup(b, 0.0, [np.array([1.0, 0.0])])
    tree.backup(c, 0.0, [np.array([0.0, 1.0])])
    tree.backup(a, 1.0, [np.array([1.0, 0.01])])  # cosine with b ~ 1.0, with c ~ 0.01
    similarity = (1.0 * 1.0) / math.hypot(1.0, 0.01)
    weight = 0.2 * similarity
    assert b.visits == pytest.approx(1 + weight)
    assert b.q == pytest.approx(weight * 1.0 / (1 + weight))
    assert b.true_visits == 1
    assert (c.visits, c.q) == (1, 0.0)


def test_widening_wants_alike_children_that_are_all_judged_bad() -> None:
    tree = _tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    tree.backup(a, -1.0, [np.array([1.0, 0.0])])
    assert not tree.wants_widening(tree.root)  # b has no embedding yet
    tree.backup(b, -1.0, [np.array([1.0, 0.001])])
    assert tree.wants_widening(tree.root)
    tree.backup(b, 1.0, [np.array([1.0, 0.001])])
    assert not tree.wants_widening(tree.root)  # b is no longer bad
    added = tree.add_children(tree.root, [TokenSet((0,), 0.4), TokenSet((9,), 0.2)])
    assert added == 1 and tree.root.children[-1].tokens == (9,)


def test_commit_keeps_the_subtree_and_smooths_the_new_root_priors() -> None:
    tree = _tree_with_children([0.9, 0.1])
    chosen = tree.root.children[0]
    tree.expand(chosen, [TokenSet((3,), 0.8), TokenSet((4,), 0.2)])
    tree.backup(chosen.children[0], 1.0, [np.array([1.0]), np.array([1.0])])
    tree.commit(chosen)
    assert tree.root is chosen and chosen.parent is None
    assert [c.prior for c in chosen.children] == pytest.approx([0.75 * 0.8 + 0.125, 0.75 * 0.2 + 0.125])
    assert chosen.children[0].true_visits == 1  # the subtree's statistics survive the rewind


def test_most_visited_child_breaks_ties_by_value() -> None:
    tree = _tree_with_children([0.5, 0.5])
    a, b = tree.root.children
    a.visits = b.visits = 3
    a.q, b.q = 0.1, 0.4
    assert tree.root.most_visited_child() is b


def test_greedy_set_probability_is_clamped_into_the_samples_range() -> None:
    greedy = TokenSet((1, 2), 0.9, greedy=True)
    samples = [TokenSet((3, 4), 0.05), TokenSet((1, 2), 0.9), TokenSet((5, 6), 0.01), TokenSet((3, 4), 0.05)]
    sets = distinct_sets(greedy, samples)
    assert [s.tokens for s in sets] == [(1, 2), (3, 4), (5, 6)]
    assert sets[0].greedy and sets[0].probability == pytest.approx(0.06)  # min(0.9, sum=0.06), >= 0.05+0.01


# ---- parameters and prompts ----------------------------------------------------------------------------

def test_params_follow_the_criterion_and_refuse_inconsistent_settings() -> None:
    assert RainParams().early_stop_visits == 6
    assert RainParams(criterion="truthful").early_stop_visits == 16
    with pytest.raises(ValueError, match="needs `question`"):
        RainParams(criterion="custom")
    with pytest.raises(ValueError, match="only used with criterion 'custom'"):
        RainParams(question="Is it short?")
    with pytest.raises(ValueError, match="exceeds max_iterations_per_commit"):
        RainParams(max_iterations_per_commit=5, min_iterations_per_commit=15)
    with pytest.raises(ValueError):
        RainParams(unknown=1)


def test_server_caps_apply_to_the_budgets() -> None:
    registry = PolicyRegistry([RainPolicy], {"rain": {"max_engine_calls": 100}})
    with pytest.raises(LimitExceeded):
        registry.resolve("rain", {"max_engine_calls": 101})
    with pytest.raises(LimitExceeded):
        registry.resolve("rain", {"max_iterations_per_commit": 1000})


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


# ---- the real engine -----------------------------------------------------------------------------------

def _rain(**params: Any) -> dict[str, Any]:
    return {"refine": {"policy": "rain", **params}}


@pytest.mark.engine
def test_self_evaluation_rejects_the_greedy_token_and_the_search_commits_another(client: OpenAI) -> None:
    """The bundled 135M model judges mostly by option position, so its values are nearly always 0 (see the
    README); this question and criterion were found by probing for a case where it rejects the greedy first
    token ("The": not a name) and not others. With max_tokens=1 every child is a final answer, evaluated
    without a rollout, so nothing in the case is sampled."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1,
        extra_body=_rain(criterion="custom", question="Is the first word of the reply a name?"))
    trace = resp.model_extra["refine"]["trace"]
    (commit,) = trace["commits"]
    greedy = next(c for c in commit["children"] if c["greedy"])
    committed = next(c for c in commit["children"] if c["tokens"] == commit["tokens"])
    assert greedy["q"] == -1.0 and greedy["true_visits"] >= 1
    assert committed["q"] > greedy["q"] and not commit["greedy"]
    assert commit["rewinds"] > 0
    assert resp.choices[0].message.content != plain.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.engine
def test_option_tokens_are_the_serving_tokenizers(client: OpenAI) -> None:
    from transformers import AutoTokenizer

    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1,
                                     extra_body=_rain(max_iterations_per_commit=1, min_iterations_per_commit=1))
    ids = resp.model_extra["refine"]["trace"]["option_token_ids"]
    model_dir = next(m for m in client.models.list() if m.id == MODEL).model_extra["root"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = tokenizer(ANSWER_LINE)["input_ids"]
    for letter, token in zip("AB", ids, strict=True):
        assert tokenizer(ANSWER_LINE + letter)["input_ids"] == [*base, token]
        assert tokenizer.decode([token]) == letter


@pytest.mark.engine
def test_streaming_sends_each_committed_set_as_it_is_committed(client: OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="The three primary colours are", max_tokens=7, seed=3, stream=True,
        extra_body=_rain(max_iterations_per_commit=4, min_iterations_per_commit=4))
    arrivals, pieces, refine = [], [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].text)
        refine = (chunk.model_extra or {}).get("refine") or refine
    commits = refine["trace"]["commits"]
    assert [len(c["tokens"]) for c in commits] == [1, 2, 4]
    assert len(pieces) == len(commits)  # one piece per commit, none held back
    # The first piece left before the later commits were searched, not with the finished answer.
    later_search = sum(c["seconds"] for c in commits[1:])
    assert arrivals[-1] - arrivals[0] > 0.5 * later_search > 0


@pytest.mark.engine
def test_an_exhausted_call_budget_commits_the_best_node_then_decodes_plainly(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="List three fruits:", max_tokens=12, temperature=0,
                                     extra_body=_rain(max_engine_calls=6))
    trace = resp.model_extra["refine"]["trace"]
    assert trace["budget_exhausted"] == "max_engine_calls"
    engine = trace["engine"]
    assert engine["total"]["calls"] - engine["finish"]["calls"] <= 6
    assert len(trace["commits"]) >= 1 and trace["commits"][-1]["stopped"] == "max_engine_calls"
    assert trace["plain_tokens"] > 0
    assert trace["answer_tokens"] == sum(len(c["tokens"]) for c in trace["commits"]) + trace["plain_tokens"]
    assert resp.choices[0].text


@pytest.mark.engine
def test_the_wall_time_budget_bounds_the_search(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=40,
        extra_body=_rain(max_seconds=2.0))
    trace = resp.model_extra["refine"]["trace"]
    assert trace["budget_exhausted"] == "max_seconds"
    assert sum(c["seconds"] for c in trace["commits"]) < 2.0 + 3.0  # unbounded: a minute or more
    assert resp.choices[0].message.content


@pytest.mark.engine
def test_a_stop_string_ends_the_answer_where_it_appears(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        stop=[" "], extra_body=_rain(max_iterations_per_commit=3, min_iterations_per_commit=3))
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert text and " " not in text
    assert len(resp.model_extra["refine"]["trace"]["commits"]) < 4  # the search ended with the stop string


@pytest.mark.engine
def test_parallel_leaves_search_on_the_real_engine(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3, seed=1,
        extra_body=_rain(parallel_leaves=4, max_iterations_per_commit=8, min_iterations_per_commit=8))
    trace = resp.model_extra["refine"]["trace"]
    assert [c["iterations"] for c in trace["commits"]] == [8, 8]  # sets of 1 and 2 tokens
    assert trace["answer_tokens"] == 3 and resp.choices[0].text


@pytest.mark.engine
def test_bad_rain_parameters_are_400s(client: OpenAI) -> None:
    import openai

    messages = [{"role": "user", "content": "Hi"}]
    for refine, param in [({"criterion": "custom"}, "refine"), ({"max_iterations_per_commit": 1000},
                          "refine.max_iterations_per_commit"), ({"set_lengths": [0]}, "refine")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=messages, extra_body=_rain(**refine))
        assert err.value.body["param"].startswith(param)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, n=2, extra_body=_rain())
    assert err.value.body["param"] == "n"


@pytest.mark.engine
def test_search_metrics_are_exported_per_policy(client: OpenAI, refine_server) -> None:
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                              extra_body=_rain(max_iterations_per_commit=2, min_iterations_per_commit=2))
    text = httpx.get(f"{refine_server.url}/metrics").text
    for family in ("refine_search_iterations_per_request", "refine_rewinds_per_request",
                   "refine_engine_calls_per_request"):
        assert re.search(rf'^{family}_count{{policy="rain"}} [1-9]', text, re.M), family
    assert re.search(r'^refine_engine_calls_per_request_sum{policy="rain"} [1-9]', text, re.M)


def _engine_idle_for(engine_url: str, seconds: float) -> bool:
    """True once the engine has no running request and starts none for `seconds`."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(f"{engine_url}/metrics").text
        if metric_total(text, "vllm:num_requests_running") == 0:
            finished = metric_total(text, "vllm:e2e_request_latency_seconds_count")
            time.sleep(seconds)
            text = httpx.get(f"{engine_url}/metrics").text
            if metric_total(text, "vllm:e2e_request_latency_seconds_count") == finished:
                return metric_total(text, "vllm:num_requests_running") == 0
        time.sleep(0.2)
    return False


@pytest.mark.engine
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_the_search(refine_server, engine_url: str, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "Write a long story about a dragon:", "max_tokens": 300, "stream": stream,
            **_rain(max_iterations_per_commit=5, min_iterations_per_commit=5)}
    if stream:
        with httpx.stream("POST", f"{refine_server.url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            next(line for line in resp.iter_lines() if line.startswith("data:"))  # the first commit
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{refine_server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=4.0))
    assert _engine_idle_for(engine_url, 2.0), "the search kept calling the engine after the client left"


def test_the_embedder_narrows_torch_threads_only_while_it_encodes() -> None:
    """The server process's torch setting is the embedder's only while it encodes (a shared machine)."""
    import torch

    seen = []

    class Model:
        def encode(self, texts, **_):
            seen.append(torch.get_num_threads())
            return np.zeros((len(texts), 3))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _encode(Model(), ["a"])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
