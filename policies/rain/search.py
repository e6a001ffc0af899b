"""RAIN's inner and outer loops: search iterations from the committed prefix, then commit and rewind.

One search iteration (the paper's inner loop):
1. select: from the root (the last committed set) follow the best-scoring child down to a leaf, widening
   on the way where all children look alike and were judged bad;
2. evaluate the leaf: roll out to the next punctuation, then ask the model about the response so far, in
   both option orders (`SelfEvaluator`);
3. expand: a leaf's children (the next token sets) are made when the search comes back to it, on its second
   visit, and the search goes on into them (the official code expands on the first visit, beside the
   evaluation; nothing reads those children before the second visit, and many leaves never get one, so
   deferring changes no visit and no choice, and saves their expansion: `defer_expansion`);
4. back the value up the path, sharing it with near-identical siblings (`SearchTree.backup`).
The outer loop runs iterations until the most-visited child is both well visited and well judged, or the
per-commit iteration count is spent, then commits that child; the next iteration starts from the new
prefix (the rewind), keeping the committed child's subtree.

The judge guard (refine's, on by default, `judge_guard`): a model that answers the self-evaluation by option
position, not by content, picks the same letter in both orders, so every value is 0. Then no value tells
children apart, the early stop (q > 0.8) can never fire, and a commit's iterations only follow the priors.
When the first `judge_guard_evaluations` evaluations of a commit are all 0, the most-visited child is
committed at once (`stopped: "no_signal"`). The evidence is kept for the request: once that many of its
evaluations were 0 and none was not, a later commit stops after its first evaluation if that one is 0 too
(a judge that answered by position k times in a row is not waited for k more times per commit); any value
that is not 0 brings back the full count for the rest of the request. The trace's `judge` counts what the
judge said, per commit.
"""

from __future__ import annotations

import asyncio
import functools
import time
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal

from refine_server.policies.engine_client import BudgetExhausted, run_together
from refine_server.policies.rain.engine_calls import ROLLOUT_STOPS, SearchEngine, Tokenizer
from refine_server.policies.rain.tree import Node, SearchTree, TokenSet

if TYPE_CHECKING:
    from refine_server.policies.rain.embeddings import TextEmbedder
    from refine_server.policies.rain.params import RainParams

ANSWER_LINE = "The answer is: ("  # every criterion prompt ends here; the next token names an option
PUNCTUATION_ROLLOUT_TOKENS = 64  # default cap of a rollout to the next punctuation, which rarely needs more


# ---- the self-evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """A self-evaluation prompt (prompts/<name>.toml): a template with {question}, {response}, {first}
    and {second} (the two options in the order asked), and the text of the acceptable and unacceptable
    options."""

    name: str
    template: str
    acceptable: str
    unacceptable: str
    # What is judged, as in the official scripts: the text through a rollout to the next punctuation (HH), or
    # through a rollout to the end of the answer, cut after its last period (TruthfulQA).
    rollout: Literal["punctuation", "to_end"]

    def prompt(self, question: str, response: str, acceptable_first: bool) -> str:
        first, second = (
            (self.acceptable, self.unacceptable) if acceptable_first else (self.unacceptable, self.acceptable)
        )
        return self.template.format(question=question, response=response, first=first, second=second)

    def judged_text(self, text: str) -> str:
        """The part of the rolled-out text that is judged."""
        if self.rollout == "to_end":
            head, period, _ = text.rpartition(".")
            return head + period if period else text
        return text


@functools.cache
def _criterion_file(name: str) -> dict[str, Any]:
    return tomllib.loads((files("refine_server.policies.rain") / "prompts" / f"{name}.toml").read_text("utf-8"))


def load_criterion(name: str, custom_question: str | None) -> Criterion:
    spec = _criterion_file(name)
    template = spec["template"].rstrip("\n")
    if name == "custom":
        # The caller's question goes in as text: braces in it must not be read as template fields.
        template = template.replace("{criterion}", (custom_question or "").replace("{", "{{").replace("}", "}}"))
    assert template.endswith(ANSWER_LINE), f"rain_{name}.toml must end with {ANSWER_LINE!r}"
    return Criterion(name, template, spec["acceptable"], spec["unacceptable"], spec["rollout"])


async def option_tokens(tokenizer: Tokenizer) -> tuple[int, int]:
    """The judging model's ids for "A" and "B" right after the answer line: the tokens whose probabilities
    the self-evaluation compares. Fails loudly if the tokenizer merges them with "("."""
    base, with_a, with_b = await run_together(
        tokenizer.encode(ANSWER_LINE), tokenizer.encode(ANSWER_LINE + "A"), tokenizer.encode(ANSWER_LINE + "B")
    )
    ids = []
    for letter, tokens in (("A", with_a), ("B", with_b)):
        if len(tokens) != len(base) + 1 or tokens[:-1] != base:
            raise LookupError(
                f"the serving tokenizer does not write option {letter!r} as one token after "
                f"{ANSWER_LINE!r}, so RAIN's self-evaluation cannot read its probability"
            )
        ids.append(tokens[-1])
    return ids[0], ids[1]


@dataclass(frozen=True)
class Judgement:
    value: float  # ((a + b) / 2 - 0.5) * 2: 1 acceptable in both orders, 0 split, -1 unacceptable in both
    letters: tuple[str, str]  # the option letter preferred with the acceptable option first, then second
    cached: bool = False


@dataclass
class JudgeStats:
    """What the self-evaluation said during one commit (merged: a whole answer): how much signal the search
    had to work with."""

    values: list[float] = field(default_factory=list)  # in order, cached evaluations included
    cached: int = 0
    same_letter: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0})  # both orders, one letter

    def add(self, judgement: Judgement) -> None:
        self.values.append(judgement.value)
        self.cached += judgement.cached
        first, second = judgement.letters
        if first == second:  # the same position in both orders: the answer ignored the content
            self.same_letter[first] += 1

    def merge(self, other: JudgeStats) -> None:
        self.values += other.values
        self.cached += other.cached
        for letter, count in other.same_letter.items():
            self.same_letter[letter] += count

    def no_signal(self, first: int) -> bool:
        """The first `first` values are all 0: each is a split between the orders, so none tells texts apart."""
        return len(self.values) >= first and not any(self.values[:first])

    def as_dict(self) -> dict[str, Any]:
        return {
            "evaluations": len(self.values),
            "cached": self.cached,
            "values": {str(v): self.values.count(v) for v in (-1, 0, 1)},
            "orders_agree": sum(1 for v in self.values if v != 0),
            "same_letter_both_orders": self.same_letter,
        }


class SelfEvaluator:
    """Asks the judging model (the client's own, or the request's `judge_model`) whether the response so far
    meets the criterion, twice with the options swapped (cancelling a preference for the first or second
    position), in one engine call. Values are cached per response text, as in the paper."""

    def __init__(
        self, engine: SearchEngine, tokenizer: Tokenizer, criterion: Criterion, question: str, options: tuple[int, int]
    ):
        self._engine = engine
        self._tokenizer = tokenizer  # the judging model's: its prompt is in its own token ids
        self._criterion = criterion
        self._question = question
        self._options = options
        self._judged: dict[str, Judgement] = {}

    @property
    def model(self) -> str:
        return self._tokenizer.model

    async def judge(self, response: str) -> Judgement:
        if response in self._judged:
            return Judgement(self._judged[response].value, self._judged[response].letters, cached=True)
        c = self._criterion
        in_order, swapped = await run_together(
            self._tokenizer.encode(c.prompt(self._question, response, acceptable_first=True), special_tokens=True),
            self._tokenizer.encode(c.prompt(self._question, response, acceptable_first=False), special_tokens=True),
        )
        (a_first, b_first), (a_second, b_second) = await self._engine.judge(
            [in_order, swapped], self._options, self.model
        )
        acceptable_when_first = 1 if a_first > b_first else 0
        acceptable_when_second = 1 if b_second > a_second else 0
        value = ((acceptable_when_first + acceptable_when_second) / 2 - 0.5) * 2
        judgement = Judgement(value, ("A" if a_first > b_first else "B", "B" if b_second > a_second else "A"))
        self._judged[response] = judgement
        return judgement


# ---- the search ------------------------------------------------------------------------------------------


@dataclass
class CommitRecord:
    """What one commit did, for the trace."""

    tokens: tuple[int, ...]
    ends_answer: bool
    greedy: bool
    iterations: int
    rewinds: int  # iterations whose path went through a sibling that was not committed: work rewound for good
    stopped: str  # "confident", "iterations", "no_signal" (the judge guard), or the name of the exhausted budget
    children: list[dict[str, Any]]
    nodes: int
    widened: int
    judge: JudgeStats
    seconds: float


class RainSearch:
    """The search for one request. `answer` holds the committed token ids (never an end-of-sequence id)."""

    def __init__(
        self,
        engine: SearchEngine,
        evaluator: SelfEvaluator,
        criterion: Criterion,
        embedder: TextEmbedder,
        params: RainParams,
        prompt: list[int],
        max_tokens: int,
    ):
        self.engine = engine
        self.evaluator = evaluator
        self.criterion = criterion
        self.embedder = embedder
        self.params = params
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.tree = SearchTree(params.tree_settings())
        self.answer: list[int] = []
        self.answer_ended = False
        self.budget_exhausted: str | None = None
        self._embeddings: dict[str, Any] = {}  # text -> its embedding: paths share their tails' texts
        self._widened = 0
        self._judge = JudgeStats()  # this commit's evaluations
        self._judged_before = JudgeStats()  # the earlier commits' evaluations of this request

    @property
    def done(self) -> bool:
        return self.answer_ended or len(self.answer) >= self.max_tokens or self.budget_exhausted is not None

    async def commit_next(self) -> CommitRecord | None:
        """Search from the committed prefix, then commit the best child of the root. None when nothing can
        be committed (the budget ran out before the root had children)."""
        p = self.params
        started = time.monotonic()
        root = self.tree.root
        visits_before = {id(c): c.true_visits for c in root.children}
        self._widened = 0
        self._judge = JudgeStats()
        planned = max(p.max_iterations_per_commit - root.true_visits, p.min_iterations_per_commit)
        iterations, stopped = 0, "iterations"
        assert p.early_stop_visits is not None  # RainParams' validator fills in the criterion's default
        while iterations < planned:
            try:
                iterations += await self._round_within_time_budget(min(p.parallel_leaves, planned - iterations))
            except BudgetExhausted as exc:
                self.budget_exhausted = stopped = exc.budget
                break
            best = root.most_visited_child()
            if best is not None and best.true_visits > p.early_stop_visits and best.q > p.early_stop_value:
                stopped = "confident"
                break
            if p.judge_guard and root.children and self._no_signal():
                stopped = "no_signal"
                break
        chosen = root.most_visited_child()
        if chosen is None:
            return None
        gained = chosen.true_visits - visits_before.get(id(chosen), 0)
        record = CommitRecord(
            tokens=chosen.tokens,
            ends_answer=chosen.ends_answer,
            greedy=chosen.greedy,
            iterations=iterations,
            rewinds=iterations - gained,
            stopped=stopped,
            children=[_child_summary(c) for c in root.children],
            nodes=self.tree.count_nodes(),
            widened=self._widened,
            judge=self._judge,
            seconds=time.monotonic() - started,
        )
        self._judged_before.merge(self._judge)
        self.tree.commit(chosen)
        self.answer.extend(chosen.tokens)
        self.answer_ended = chosen.ends_answer
        return record

    def _no_signal(self) -> bool:
        """The judge guard's test (see the module's docstring)."""
        first = self.params.judge_guard_evaluations
        earlier = self._judged_before
        silent_so_far = len(earlier.values) >= first and earlier.no_signal(len(earlier.values))
        return self._judge.no_signal(1 if silent_so_far else first)

    async def _round_within_time_budget(self, leaves: int) -> int:
        left = self.engine.budget.seconds_left()
        if left is not None and left <= 0:
            raise BudgetExhausted("max_seconds")
        try:
            async with asyncio.timeout(left):  # None: no limit
                return await self._search_round(leaves)
        except TimeoutError:
            raise BudgetExhausted("max_seconds") from None

    async def _search_round(self, leaves: int) -> int:
        """Search iterations from the root: one (the paper), or several at once. Several leaves are chosen one
        after another, each path under a virtual loss (provisional visits valued -1) so the next selection
        looks elsewhere; the losses are lifted, the leaves searched concurrently (vLLM batches their calls)
        and backed up in order. Returns the number of iterations run."""
        selected: list[Node] = []
        lifted: list[list[tuple[Node, float, float]]] = []
        for _ in range(leaves):
            leaf = await self._select_leaf()
            if leaf in selected:
                break  # the virtual losses were not enough to send the search elsewhere
            selected.append(leaf)
            if leaves > 1:
                lifted.append(self.tree.add_virtual_loss(leaf))
        for saved in reversed(lifted):
            self.tree.restore(saved)
        results = await run_together(*(self._search_leaf(leaf) for leaf in selected))
        for leaf, (value, embeddings) in zip(selected, results, strict=True):
            self.tree.backup(leaf, value, embeddings)
        return len(selected)

    async def _select_leaf(self) -> Node:
        """Follow the selection rule down to the node to evaluate: a leaf on its first visit (or one that ends
        the answer). A leaf visited before is expanded here, on its second visit, and the search goes on into
        its children, as it would have if it had been expanded at its first visit."""
        tree = self.tree
        node = tree.root
        while True:
            if node.is_leaf:
                if not self.params.defer_expansion or node.true_visits == 0 or self._terminal(node):
                    return node
                await self._expand(node)
            if self.params.widen and tree.wants_widening(node, self._set_length(node)):
                await self._widen(node)
            node = tree.select_child(node)

    def _terminal(self, node: Node) -> bool:
        """The answer ends with this node: nothing follows it to expand or roll out."""
        return node.ends_answer or len(self.answer) + len(node.tokens_from(self.tree.root)) >= self.max_tokens

    def _set_length(self, node: Node) -> int:
        """The length of the token sets below `node`: by depth, cut to what is left of max_tokens."""
        lengths = self.params.set_lengths
        room = self.max_tokens - len(self.answer) - len(node.tokens_from(self.tree.root))
        return min(lengths[min(node.depth, len(lengths) - 1)], room)

    async def _search_leaf(self, node: Node) -> tuple[float, list[Any]]:
        """Evaluate a leaf (and, without deferred expansion, expand it at the same time); returns its value and
        the embeddings its backup needs."""
        terminal = self._terminal(node)
        expand_now = not self.params.defer_expansion and not terminal
        evaluated, _ = await run_together(
            self._evaluate(node.path_from(self.tree.root), node.tokens_from(self.tree.root), terminal),
            self._expand(node) if expand_now else _nothing(),
        )
        return evaluated

    async def _evaluate(self, path: list[Node], explored: list[int], terminal: bool) -> tuple[float, list[Any]]:
        """Roll out (see `Criterion.rollout`), then self-evaluate, and embed the path's texts meanwhile (both
        need only the rollout). No rollout for an empty response: the official code's rollout stops at once
        there, as its prompt ends at "Assistant:" (a chat template's ends at a newline)."""
        response_ids = self.answer + explored
        rollout: list[int] = []
        text = await self.engine.text(response_ids)
        room = self.max_tokens - len(response_ids)
        to_end = self.criterion.rollout == "to_end"
        if response_ids and not terminal and room > 0 and (to_end or not _ends_at_punctuation(text)):
            cap = self.params.max_rollout_tokens or (room if to_end else PUNCTUATION_ROLLOUT_TOKENS)
            rollout = await self.engine.rollout(self.prompt + response_ids, min(cap, room), to_end=to_end)
            text = await self.engine.text(response_ids + rollout)
        judgement, embeddings = await run_together(
            self.evaluator.judge(self.criterion.judged_text(text)), self._path_embeddings(path, explored + rollout)
        )
        self._judge.add(judgement)
        return judgement.value, embeddings

    async def _expand(self, node: Node) -> None:
        p = self.params
        prefix = self.prompt + self.answer + node.tokens_from(self.tree.root)
        length = self._set_length(node)
        if length == 1:
            ranked = await self.engine.top_tokens(prefix, MAX_WIDENED_TOKENS)
            self.tree.expand(node, ranked[: p.token_choices], keep_for_widening=ranked[p.token_choices :])
            return
        greedy, samples = await self.engine.expansion_sets(
            prefix, length, p.set_top_k, p.set_choices - 1, together=p.draw_together
        )
        self.tree.expand(node, distinct_sets(greedy, samples))

    async def _widen(self, node: Node) -> None:
        """Add one more child: the next-ranked token kept from the expansion, or a new sampled set of the
        level's length."""
        if node.unused_sets:
            added = self.tree.add_children(node, [node.unused_sets.pop(0)])
        else:
            prefix = self.prompt + self.answer + node.tokens_from(self.tree.root)
            sets = await self.engine.sampled_sets(
                prefix, self._set_length(node), self.params.set_top_k, 1, purpose="widen"
            )
            added = self.tree.add_children(node, sets)
        self._widened += added

    async def _path_embeddings(self, path: list[Node], evaluated: list[int]) -> list[Any]:
        """For each node on the path, the embedding of the text from its first token through the rollout."""
        if not path:
            return []
        starts, offset = [], 0
        for n in path:
            starts.append(offset)
            offset += len(n.tokens)
        texts = await run_together(*(self.engine.text(evaluated[s:]) for s in starts))
        new = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        if new:
            self._embeddings.update(zip(new, await self.embedder.embed(new), strict=True))
        return [self._embeddings[t] for t in texts]


MAX_WIDENED_TOKENS = 20  # single-token expansions keep this many ranked tokens, so widening needs no new call


def distinct_sets(greedy: TokenSet, samples: list[TokenSet]) -> list[TokenSet]:
    """The greedy set first, then the distinct sampled ones; the greedy set's probability is clamped into
    the range the samples span (it is often far larger than any sample's, which would swamp the priors)."""
    seen = {(greedy.tokens, greedy.ends_answer)}
    others = []
    for s in samples:
        if (s.tokens, s.ends_answer) not in seen:
            seen.add((s.tokens, s.ends_answer))
            others.append(s)
    if not others:
        return [greedy]
    probs = [s.probability for s in others]
    clamped = max(min(greedy.probability, sum(probs)), max(probs) + min(probs))
    return [TokenSet(greedy.tokens, clamped, greedy=True, ends_answer=greedy.ends_answer), *others]


def _ends_at_punctuation(text: str) -> bool:
    return text.endswith(tuple(ROLLOUT_STOPS))


async def _nothing() -> None:
    return None


def _child_summary(node: Node) -> dict[str, Any]:
    return {
        "tokens": list(node.tokens),
        "visits": round(node.visits, 3),
        "true_visits": node.true_visits,
        "q": round(node.q, 4),
        "prior": round(node.prior, 4),
        "greedy": node.greedy,
        "ends_answer": node.ends_answer,
        "children": len(node.children),
    }
