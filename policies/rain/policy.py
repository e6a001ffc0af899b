"""RAIN: rewindable auto-regressive inference ("RAIN: Your Language Models Can Align Themselves without
Finetuning", arXiv 2309.07124). The search itself is in `search.py`, its tree in `tree.py`, its
engine calls in `engine_calls.py`; this module is the policy: parameters, the client's request, budgets,
streaming each committed token set, the response and the trace.

Where this follows the official code (github.com/SafeAILab/RAIN) and where it differs:
- Same: token sets of 1, 2, 4, then 10 tokens by depth; top-10 single tokens, or the greedy set plus up to 9
  distinct sets sampled from the top-15 distribution; priors from the engine's probabilities (greedy clamped,
  root smoothed 0.75 p + 0.25 uniform); selection q_hat + 2 p sqrt(N) / (1 + n) with q normalised over
  [-1, 1]; rollouts sampled from the full distribution, to the next `, . ? : ;` or newline (harmless,
  custom) or to the end of the answer and cut after the last period (truthful), none for an empty response
  (the official prompt ends at "Assistant:", where its rollout stops at once); the swapped-order
  self-evaluation v = ((a + b) / 2 - 0.5) * 2 cached per text; backup with the 0.2-weighted similarity
  update at cosine >= 0.95 (all-MiniLM-L6-v2); widening when the children's embedding variance (N - 1, as
  torch.var) is below 0.03 per token of the level's set length and every child's q < 0; max(50 - visits,
  15) iterations per commit, early stop when the most-visited child has more than 6 (harmless) / 16
  (truthful) visits and q > 0.8; commit the most-visited child and keep its subtree.
- Same visits and choices, less work: a leaf is expanded on its second visit, when its children are first
  read, not on its first (`defer_expansion`; False expands on the first visit, beside the evaluation, as the
  official code). Only the order of the engine calls changes, so a seeded search samples other sets.
- Same sets, less work: a level's greedy set and samples are drawn together from the distributions a streamed
  greedy path reports, so samples that begin alike compute their beginning once, as with the official code's
  logits cache (`draw_together`, `set_drawing.py`; it needs the served model's end-of-sequence ids, so only where
  its files are readable here: elsewhere, or with `draw_together: false`, the samples are vLLM's `n`).
- Different: the self-evaluation prompts are new few-shot prompts in the same A/B format (prompts/), and the
  truthful criterion also asks both orders (the official TruthfulQA script asks once, with Yes/No). The
  option ids come from the judging tokenizer, not LLaMA's. The prompt is the client's conversation through
  the model's chat template, and the evaluation reads its last user message and the answer so far (the
  official scripts wrap raw text in their own few-shot dialogue). A rollout stops after
  `max_rollout_tokens` (default 64 to punctuation; truthful: the rest of the answer, which is where the
  official one stops too). Widening a multi-token level samples one new set (the official code asks for a
  greedy and a sampled set; the greedy one is always present already).
- Beyond the paper, on by default: the judge guard (`judge_guard`, see search.py): when the first
  `judge_guard_evaluations` (4) evaluations of a commit are all 0, the judge answered by position in every
  one, and the most-visited child is committed at once; once a request's judge has done so, with no other
  value yet, a later commit needs only its first evaluation to be 0 too. `judge_guard: false` is the paper's
  search.
- Beyond the paper, optional: `judge_model` lets another model on the same upstream answer the
  self-evaluation (a small generator with a stronger judge); `parallel_leaves` > 1 searches several leaves
  at once (virtual loss, as in parallel MCTS), so vLLM batches their calls; each leaf still counts as one
  iteration.
- Added for serving: budgets (engine calls, search tokens, wall time, per-commit iterations) with server
  caps; when one runs out the best child is committed and the rest of the answer is decoded plainly with the
  client's sampling, and the trace says so. The client's `max_tokens` (default 256, within the server's
  default; the trace's `max_tokens`) and `stop` apply.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refine_server.policies.base import (
    CORRECTION_SECONDS,
    CORRECTIONS,
    ENGINE_CALLS,
    EXTRA_TOKENS,
    REWINDS,
    SEARCH_ITERATIONS,
    Policy,
    PolicyCall,
    PolicyRequestError,
)
from refine_server.policies.engine_client import Budget, EngineClient
from refine_server.policies.rain.embeddings import TextEmbedder
from refine_server.policies.rain.engine_calls import SearchEngine, Tokenizer, load_local_tokenizer
from refine_server.policies.rain.params import RainLimits, RainParams
from refine_server.policies.rain.search import (
    CommitRecord,
    JudgeStats,
    RainSearch,
    SelfEvaluator,
    load_criterion,
    option_tokens,
)
from refine_server.policies.response_bodies import AnswerShapes

if TYPE_CHECKING:
    from refine_server.policies.request import ClientRequest


DEFAULT_MAX_TOKENS = 256  # a search needs a length bound; the client's max_tokens overrides it
# Client fields that steer plain decoding after a budget runs out (the search sets its own sampling).
PLAIN_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


# ---- the client's request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What RAIN keeps of the client's request."""

    messages: list[dict[str, Any]] | None  # chat
    prompt: str | list[int] | None  # completions
    max_tokens: int
    plain_sampling: dict[str, Any]


def read_request(request: ClientRequest) -> Request:
    request.require_one_choice("rain", "searches for one answer")
    body = request.body
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        raise PolicyRequestError("policy rain returns no logprobs and no echo", "logprobs")
    if request.endpoint == "chat":
        request.question("rain")  # the question must be a user message of text
    return Request(
        messages=request.messages,
        prompt=request.one_prompt("rain") if request.endpoint == "completions" else None,
        max_tokens=_answer_length(request),
        plain_sampling={k: body[k] for k in PLAIN_SAMPLING_FIELDS if body.get(k) is not None},
    )


def _answer_length(request: ClientRequest) -> int:
    """The client's max_tokens; where it set none, RAIN's own default, within the server's."""
    if request.max_tokens is None:
        return DEFAULT_MAX_TOKENS
    return min(request.max_tokens, DEFAULT_MAX_TOKENS) if request.max_tokens_defaulted else request.max_tokens


# ---- one request -----------------------------------------------------------------------------------------


class RainRun:
    """One request: tokenise, search and commit until the answer ends, stream what is committed."""

    def __init__(self, policy: RainPolicy, call: PolicyCall, params: RainParams):
        self.call = call
        self.params = params
        self.request = read_request(call.request)
        self.criterion = load_criterion(params.criterion, params.question)
        call.engine.budget = Budget(params.max_engine_calls, params.max_search_tokens, params.max_seconds)
        self._policy = policy
        # Its tokenizer is the engine's /tokenize until `_start` knows whether the model's files are readable here.
        self.engine = SearchEngine(call.engine, Tokenizer(call.engine, call.request.model))
        self.judge: Tokenizer | None = None  # the judging model's tokenizer
        self.search: RainSearch | None = None
        self.options: tuple[int, int] | None = None  # the judging model's ids of "A" and "B"
        self.commits: list[CommitRecord] = []
        self.text = ""  # the answer as sent so far
        self.plain_tokens = 0  # tokens decoded plainly after a budget ran out
        self.finish_reason = "length"
        self.shapes = AnswerShapes(call.request.endpoint, call.request.model)
        self.started = time.monotonic()

    async def answer(self) -> AsyncIterator[str]:
        """The answer's text, one piece per committed token set, as soon as it is committed."""
        search = await self._start()
        while not search.done:
            record = await search.commit_next()
            if record is None:
                break
            self.commits.append(record)
            piece, stopped = await self._new_text(search.answer)
            if piece:
                yield piece
            if stopped:
                self.finish_reason = "stop"
                return
        if search.answer_ended:
            self.finish_reason = "stop"
        elif search.budget_exhausted and len(search.answer) < self.request.max_tokens:
            async for piece in self._finish_plainly(search):
                yield piece

    async def _start(self) -> RainSearch:
        r = self.request
        model = self.call.request.model
        generator, judge = await self._policy.tokenizers(self.call.engine, model, self.params.judge_model or model)
        self.engine.tokenizer, self.judge = generator, judge
        if r.messages is not None:
            body = self.call.request.body
            fields = {k: body[k] for k in ("chat_template_kwargs",) if k in body}
            prompt_ids = await self.engine.tokenize_chat(r.messages, fields)
            question = self.call.request.question("rain")[1]
        elif isinstance(r.prompt, str):
            prompt_ids = await self.engine.tokenize(r.prompt, special_tokens=True)
            question = r.prompt
        else:
            prompt_ids = list(r.prompt or [])
            question = await self.engine.text(prompt_ids)
        options = self.options = await self._policy.options_for(judge)
        evaluator = SelfEvaluator(self.engine, judge, self.criterion, question, options)
        self.search = RainSearch(
            self.engine, evaluator, self.criterion, self._policy.embedder, self.params, prompt_ids, r.max_tokens
        )
        return self.search

    async def _new_text(self, answer: list[int]) -> tuple[str, bool]:
        """The text committed since the last piece, cut at a client stop string (then True)."""
        full = await self.engine.text(answer)
        for stop in self.call.request.stop:
            at = full.find(stop)
            if at >= 0:
                piece = full[len(self.text) : at] if at > len(self.text) else ""
                self.text += piece
                return piece, True
        # A token set can end inside a multi-byte character: hold that back until it is complete.
        if full.endswith("\ufffd"):
            return "", False
        piece = full[len(self.text) :]
        self.text = full
        return piece, False

    async def _finish_plainly(self, search: RainSearch) -> AsyncIterator[str]:
        sampling = {**self.request.plain_sampling, "max_tokens": self.request.max_tokens - len(search.answer)}
        if self.call.request.stop:
            sampling["stop"] = self.call.request.stop
        # Any text held back at a split character is emitted with the first plain piece.
        pending = (await self.engine.text(search.answer))[len(self.text) :]
        async for event in self.engine.stream_plain(search.prompt + search.answer, sampling):
            for choice in event.get("choices") or ():
                self.plain_tokens += len(choice.get("token_ids") or ())
                piece = pending + (choice.get("text") or "")
                pending = ""
                if piece:
                    self.text += piece
                    yield piece
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]

    # ---- the response ------------------------------------------------------------------------------------

    def fill_trace(self) -> None:
        s = self.call.engine.spend
        search = self.search
        answer_tokens = (len(search.answer) if search else 0) + self.plain_tokens
        iterations = sum(c.iterations for c in self.commits)
        rewinds = sum(c.rewinds for c in self.commits)
        judged = JudgeStats()
        for c in self.commits:
            judged.merge(c.judge)
        self.call.trace.data = {
            "criterion": self.criterion.name,
            "option_token_ids": list(self.options) if self.options else None,
            "judge": {
                "model": self.judge.model if self.judge else None,
                "guard": self.params.judge_guard,
                **judged.as_dict(),
                "no_signal_commits": sum(c.stopped == "no_signal" for c in self.commits),
            },
            "tokenizer": self.engine.tokenizer.where,
            "commits": [_commit_trace(c) for c in self.commits],
            "iterations": iterations,
            "rewinds": rewinds,
            "budget_exhausted": search.budget_exhausted if search else None,
            "plain_tokens": self.plain_tokens,
            "answer_tokens": answer_tokens,
            "max_tokens": self.request.max_tokens,  # the answer's bound: the client's, or the default's
            "engine": {
                "total": s.total().as_dict(),
                **{purpose: cost.as_dict() for purpose, cost in s.by_purpose.items()},
            },
            "tokenizer_calls": s.tokenizer_calls,
            # The expansions' multi-token sets, in tokens: against `expand` completion tokens, what drawing them
            # together saved (set_drawing.py).
            "set_tokens": self.engine.set_tokens,
            "seconds": round(time.monotonic() - self.started, 3),
        }
        t = self.call.trace
        t.record(SEARCH_ITERATIONS, iterations)
        t.record(REWINDS, rewinds)
        t.record(ENGINE_CALLS, s.engine_calls)
        t.record(CORRECTIONS, sum(1 for c in self.commits if not c.greedy))  # commits that overrode the greedy set
        t.record(CORRECTION_SECONDS, sum(c.seconds for c in self.commits))
        t.record(EXTRA_TOKENS, max(s.completion_tokens - answer_tokens, 0))


def _commit_trace(c: CommitRecord) -> dict[str, Any]:
    return {
        "tokens": list(c.tokens),
        "greedy": c.greedy,
        "ends_answer": c.ends_answer,
        "iterations": c.iterations,
        "rewinds": c.rewinds,
        "stopped": c.stopped,
        "nodes": c.nodes,
        "widened": c.widened,
        "evaluations": len(c.judge.values),
        "cached_evaluations": c.judge.cached,
        "judge": c.judge.as_dict(),
        "seconds": round(c.seconds, 3),
        "children": c.children,
    }


class RainPolicy(Policy[RainParams]):
    name = "rain"
    Params = RainParams
    Limits = RainLimits
    metrics = (*Policy.metrics, CORRECTIONS, EXTRA_TOKENS, SEARCH_ITERATIONS, REWINDS, ENGINE_CALLS)
    refuses_fields = ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "echo")
    warms_up = True

    def __init__(self) -> None:
        self.embedder = TextEmbedder()
        self._options: dict[str, tuple[int, int]] = {}  # judging model -> ids of "A" and "B"
        self._local_tokenizers: dict[str, Any] = {}  # a model's folder -> its tokenizer (None: not readable here)

    async def tokenizers(self, engine: EngineClient, model: str, judge_model: str) -> tuple[Tokenizer, Tokenizer]:
        """The tokenizers of the generating and the judging model; the judging model must be served."""
        roots = {m["id"]: m.get("root") for m in await engine.served_models()}
        if judge_model not in roots:
            raise PolicyRequestError(
                f"policy rain: judge_model {judge_model!r} is not served by this upstream "
                f"(it serves {', '.join(sorted(roots))})",
                "refine.judge_model",
            )
        return (
            Tokenizer(engine, model, await self._local_tokenizer(roots.get(model))),
            Tokenizer(engine, judge_model, await self._local_tokenizer(roots[judge_model])),
        )

    async def warm_up(self, served_models: list[dict[str, Any]]) -> None:
        """The embedding model (seconds: the first request's time went mostly here) and the served models'
        tokenizers, where their folders are readable here."""
        await self.embedder.load()
        for model in served_models:
            await self._local_tokenizer(model.get("root"))

    async def _local_tokenizer(self, root: str | None) -> Any:
        if root is None:
            return None
        if root not in self._local_tokenizers:
            self._local_tokenizers[root] = await load_local_tokenizer(root)
        return self._local_tokenizers[root]

    async def options_for(self, judge: Tokenizer) -> tuple[int, int]:
        if judge.model not in self._options:
            try:
                self._options[judge.model] = await option_tokens(judge)
            except LookupError as exc:
                raise PolicyRequestError(
                    f"policy rain cannot judge with model {judge.model!r}: {exc}", "model", code="policy_unavailable"
                ) from None
        return self._options[judge.model]

    async def complete(self, call: PolicyCall, params: RainParams) -> dict[str, Any]:
        run = RainRun(self, call, params)
        async for _ in run.answer():
            pass
        run.fill_trace()
        return run.shapes.response(run.text, run.finish_reason, call.engine.usage())

    async def stream(self, call: PolicyCall, params: RainParams) -> AsyncGenerator[dict[str, Any], None]:
        run = RainRun(self, call, params)
        first = True
        async for piece in run.answer():
            yield run.shapes.piece(piece, first)
            first = False
        # The trace is complete before the finishing chunk, which is where refine attaches it.
        run.fill_trace()
        if first:  # nothing was committed: the role still has to come
            yield run.shapes.piece("", True)
        yield run.shapes.finish(run.finish_reason)
        if call.request.include_usage:
            yield run.shapes.chunk([], usage=call.engine.usage())
