"""The engine as every policy calls it: the client's model and seed, the cost of each call by purpose, an
optional budget, and concurrent calls that cancel together.

Policies never build URLs or read HTTP statuses: they call `chat`, `completions`, `stream_completions`,
`stream_chat`, the tokenizer, or `relay` the client's own request. Failures of the engine arrive as the
backend's errors, which the route turns into the client's; a spent budget is `BudgetExhausted`, which the
policy handles.
`chat_with_token_stats` / `completions_with_token_stats` / `relay_with_token_stats` also return per-token
statistics measured in the engine (`policies/token_stats.py`), where `token_stats_unavailable()` is None.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar, overload

from refine_server.contract.params import TokenStatsParams
from refine_server.contract.protocol import EngineLink, PluginInfo
from refine_server.policies.call_fields import CallFields
from refine_server.policies.relayed import NO_CHOICES, RelayedChunk
from refine_server.policies.request import PATHS, ClientRequest, Endpoint
from refine_server.policies.token_stats import ChoiceTokenStats, measure, unavailable_reason
from refine_server.policies.transport import NO_TRACER, CallTracer, Transport

T = TypeVar("T")
T1 = TypeVar("T1")
T2 = TypeVar("T2")


class BudgetExhausted(Exception):
    def __init__(self, budget: str):
        super().__init__(f"budget {budget!r} exhausted")
        self.budget = budget


@dataclass
class Budget:
    """Caps on every engine call of one request; None: no cap. Checked before each generation call."""

    engine_calls: int | None
    tokens: int | None  # completion tokens generated
    seconds: float | None
    started: float = field(default_factory=time.monotonic)

    def seconds_left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.monotonic() - self.started)


@dataclass
class Cost:
    """What the calls of one purpose cost."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int | None = None  # None: the engine does not report prompt_tokens_details
    # The prompt tokens whose cache hits were reported. vLLM reports cached tokens for the last prompt of a
    # multi-prompt call only, so the hit rate is taken over the prompts it reports on.
    observed_prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: dict[str, Any], observed_prompt_tokens: int | None = None) -> None:
        self.prompt_tokens += usage.get("prompt_tokens") or 0
        self.completion_tokens += usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details")
        if details is not None:
            self.cached_prompt_tokens = (self.cached_prompt_tokens or 0) + (details.get("cached_tokens") or 0)
            self.observed_prompt_tokens += (
                observed_prompt_tokens if observed_prompt_tokens is not None else usage.get("prompt_tokens") or 0
            )

    def merge(self, other: Cost) -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        if other.cached_prompt_tokens is not None:
            self.cached_prompt_tokens = (self.cached_prompt_tokens or 0) + other.cached_prompt_tokens
            self.observed_prompt_tokens += other.observed_prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        hit_rate = (
            None
            if self.cached_prompt_tokens is None or not self.observed_prompt_tokens
            else round(self.cached_prompt_tokens / self.observed_prompt_tokens, 4)
        )
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prefix_cache_hit_rate": hit_rate,
        }


@dataclass
class Spend:
    """What a request's engine calls cost, by purpose (a policy's own names: "round1", "rollout", ...)."""

    by_purpose: dict[str, Cost] = field(default_factory=dict)
    tokenizer_calls: int = 0

    def cost(self, purpose: str) -> Cost:
        return self.by_purpose.setdefault(purpose, Cost())

    def total(self) -> Cost:
        total = Cost()
        for c in self.by_purpose.values():
            total.merge(c)
        return total

    @property
    def engine_calls(self) -> int:
        return sum(c.calls for c in self.by_purpose.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.by_purpose.values())


class EngineClient:
    """The backend for one client request. Every generation call carries the client's model, and its seed
    unless the call sets its own, and `fields`' length bound and priority where it sets none."""

    def __init__(
        self,
        backend: Transport,
        request: ClientRequest,
        budget: Budget | None = None,
        tracer: CallTracer = NO_TRACER,
        fields: CallFields | None = None,
    ):
        self._backend = backend
        self.request = request
        self.model = request.model
        self.seed = request.seed
        self.budget = budget
        self.fields = fields or CallFields()
        self.spend = Spend()
        self.relayed_tokens = 0  # prompt and completion tokens of relayed calls, where the engine reported them
        self._seed_counter = 0
        # A span per engine call when the server traces; NO_TRACER passes each call through as it is.
        self.tracer = tracer

    @property
    def link(self) -> EngineLink:
        """How to reach refine's plugin inside the engine (for policies that run there)."""
        return self._backend.link

    async def plugin(self) -> PluginInfo | None:
        """refine's engine plugin in this backend, as its (remembered) handshake says; None: no plugin."""
        return await self._backend.plugin(self.model)

    async def plugin_problem(self, policy: str, what: str | None = None) -> str | None:
        """Why this backend's plugin cannot run `policy` (an in-engine policy, or the token-statistics sensor)
        for this proxy, or None when it can; `what` names it in the message (default: "offer <policy>").
        The handshake is remembered: cheap to ask before every call."""
        plugin = await self.plugin()
        if plugin is None:
            return "the backend does not have refine's engine plugin"
        if policy not in plugin.handshake.policies:
            return f"the backend's refine engine plugin {plugin.handshake.version} does not {what or 'offer ' + policy}"
        if plugin.handshake.signature != "ok":
            return "the backend's refine engine plugin does not share this proxy's engine secret"
        return None

    # ---- the client's own request, forwarded -------------------------------------------------------------

    async def relay(self, body: dict[str, Any]) -> dict[str, Any]:
        body = self.fields.fill(body, LENGTH_FIELDS[self.request.endpoint])
        result = await self.tracer.call(
            "relay",
            self.request.endpoint,
            body,
            lambda: self._backend.post_json(self.request.path, body, endpoint=self.request.endpoint),
        )
        self.relayed_tokens += _tokens(result.get("usage"))
        return result

    def relay_stream(self, body: dict[str, Any]) -> AsyncGenerator[RelayedChunk, None]:
        """The engine's chunks as it sent them (JSON bytes), for a policy that does not change the stream."""
        body = self.fields.fill(body, LENGTH_FIELDS[self.request.endpoint])
        named = self.request.stream_format.named
        options = body.get("stream_options") or {}
        count = self.fields.count_stream_usage
        if count and not named:  # the named-event APIs report usage in their final events unasked
            body = {**body, "stream_options": {**options, "include_usage": True}}
        chunks = self.tracer.stream(
            "relay",
            self.request.endpoint,
            body,
            self._backend.stream_events(self.request.path, body, endpoint=self.request.endpoint, named=named),
        )
        if not count:
            return chunks
        return self._count_usage(chunks, keep_usage_chunk=named or bool(options.get("include_usage")))

    async def _count_usage(
        self, chunks: AsyncGenerator[RelayedChunk, None], *, keep_usage_chunk: bool
    ) -> AsyncGenerator[RelayedChunk, None]:
        """The relayed stream, the usage it reports counted: chat's usage chunk (choices empty, the last),
        dropped unless kept; or the named events that carry usage (Responses' final event, Messages' start
        and delta)."""
        stream_format = self.request.stream_format
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                if _USAGE in chunk and (stream_format.named or NO_CHOICES in chunk):
                    self.relayed_tokens += _tokens(_usage_of(stream_format.decode_event(chunk)))
                    if not keep_usage_chunk:
                        continue
                yield chunk

    # ---- generation --------------------------------------------------------------------------------------

    async def chat(self, purpose: str, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return await self._generate(purpose, "chat", {"messages": messages, **fields})

    async def completions(
        self, purpose: str, prompt: list[int] | list[list[int]] | str, **fields: Any
    ) -> dict[str, Any]:
        # vLLM reports cache hits for the last prompt of a batch only: count the hit rate over that one.
        observed = len(prompt[-1]) if _is_batch(prompt) else None
        return await self._generate(purpose, "completions", {"prompt": prompt, **fields}, observed)

    def stream_completions(
        self, purpose: str, prompt: list[int], *, budgeted: bool = True, **fields: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed completion, chunk by chunk. The caller may stop reading at any point: that closes the
        connection and vLLM aborts the rest; the usage reported so far is still counted.
        `budgeted=False`: the call finishes an answer after the budget ran out, so it is not checked."""
        return self._stream(purpose, "completions", {"prompt": prompt, **fields}, budgeted)

    def stream_chat(
        self, purpose: str, messages: list[dict[str, Any]], **fields: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed chat completion, chunk by chunk; as `stream_completions`, the caller may stop reading
        at any point and vLLM aborts the rest (DeepConf's stop without refine's plugin works so)."""
        return self._stream(purpose, "chat", {"messages": messages, **fields}, budgeted=True)

    async def _stream(
        self, purpose: str, endpoint: Endpoint, fields: dict[str, Any], budgeted: bool
    ) -> AsyncGenerator[dict[str, Any], None]:
        if budgeted:
            self._check_budget()
        cost = self._charge(purpose)
        body = self._body({**fields, "stream": True})
        body["stream_options"] = {
            "include_usage": True,
            "continuous_usage_stats": True,
            **(fields.get("stream_options") or {}),
        }
        usage: dict[str, Any] = {}
        try:
            chunks = self.tracer.stream(
                purpose, endpoint, body, self._backend.stream_json(PATHS[endpoint], body, endpoint=endpoint)
            )
            async with aclosing(chunks) as stream:
                async for chunk in stream:
                    usage = chunk.get("usage") or usage
                    yield chunk
        finally:
            cost.add(usage)

    def next_seed(self) -> int | None:
        """Distinct, reproducible seeds for the sampled calls of a seeded request (None: not seeded)."""
        if self.seed is None:
            return None
        self._seed_counter += 1
        return (self.seed * 1_000_003 + self._seed_counter) % (2**63)

    # ---- generation with per-token statistics from the engine (policies/token_stats.py) -------------------

    async def token_stats_unavailable(self) -> str | None:
        """Why this backend cannot report token statistics (fall back to top_logprobs), or None when it can."""
        return await unavailable_reason(self)

    # `sensor`: what the sensor is asked (the confidence's k, DeepConf's in-engine stop); None: k 20, no stop.

    async def chat_with_token_stats(
        self, purpose: str, messages: list[dict[str, Any]], *, sensor: TokenStatsParams | None = None, **fields: Any
    ) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
        """`chat`, and each choice's token statistics by choice index. Raises TokenStatsUnavailable."""
        return await measure(self, fields, lambda body: self.chat(purpose, messages, **body), sensor)

    async def completions_with_token_stats(
        self,
        purpose: str,
        prompt: list[int] | list[list[int]] | str,
        *,
        sensor: TokenStatsParams | None = None,
        **fields: Any,
    ) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
        """`completions`, and each choice's token statistics by choice index. Raises TokenStatsUnavailable."""
        return await measure(self, fields, lambda body: self.completions(purpose, prompt, **body), sensor)

    async def relay_with_token_stats(
        self, body: dict[str, Any], *, sensor: TokenStatsParams | None = None
    ) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
        """`relay`, and each choice's token statistics by choice index. Raises TokenStatsUnavailable."""
        return await measure(self, body, self.relay, sensor)

    # ---- the tokenizer -----------------------------------------------------------------------------------

    async def tokenize(self, text: str, *, special_tokens: bool = False, model: str | None = None) -> list[int]:
        """`model`: another served model's tokenizer (a policy may call a second model); default the client's."""
        body = {"prompt": text, "add_special_tokens": special_tokens, "model": model or self.model}
        return (await self._tokenizer("/tokenize", body))["tokens"]

    async def tokenize_chat(self, messages: list[dict[str, Any]], template_fields: dict[str, Any]) -> list[int]:
        body = {"messages": messages, "add_generation_prompt": True, **template_fields}
        return (await self._tokenizer("/tokenize", body))["tokens"]

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        return (await self._tokenizer("/detokenize", {"tokens": tokens, "model": model or self.model}))["prompt"]

    async def served_models(self) -> list[dict[str, Any]]:
        """The upstream's /v1/models entries (id, and root: where the engine loaded the model from)."""
        return (await self._backend.get_json("/v1/models"))["data"]

    # ---- what it cost ------------------------------------------------------------------------------------

    def engine_tokens(self) -> int:
        """Prompt and completion tokens of every engine call of the request so far, as the engine reported them:
        what a key's token budget is charged."""
        total = self.spend.total()
        return total.prompt_tokens + total.completion_tokens + self.relayed_tokens

    def usage(self) -> dict[str, Any]:
        """The OpenAI usage of the whole request: every engine call, not only the answer's tokens."""
        total = self.spend.total()
        usage: dict[str, Any] = {
            "prompt_tokens": total.prompt_tokens,
            "completion_tokens": total.completion_tokens,
            "total_tokens": total.prompt_tokens + total.completion_tokens,
        }
        if total.cached_prompt_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": total.cached_prompt_tokens}
        return usage

    # ---- internals ---------------------------------------------------------------------------------------

    async def _generate(
        self, purpose: str, endpoint: Endpoint, fields: dict[str, Any], observed_prompt_tokens: int | None = None
    ) -> dict[str, Any]:
        self._check_budget()
        cost = self._charge(purpose)
        body = self._body(fields)
        result = await self.tracer.call(
            purpose, endpoint, body, lambda: self._backend.post_json(PATHS[endpoint], body, endpoint=endpoint)
        )
        cost.add(result.get("usage") or {}, observed_prompt_tokens)
        return result

    def _body(self, fields: dict[str, Any]) -> dict[str, Any]:
        body = {"model": self.model, **fields}
        if self.seed is not None and "seed" not in fields:
            body["seed"] = self.seed
        return self.fields.fill(body)

    async def _tokenizer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.spend.tokenizer_calls += 1
        return await self._backend.post_json(path, {"model": self.model, **body}, endpoint="tokenize")

    def _check_budget(self) -> None:
        b, s = self.budget, self.spend
        if b is None:
            return
        if b.engine_calls is not None and s.engine_calls >= b.engine_calls:
            raise BudgetExhausted("max_engine_calls")
        if b.tokens is not None and s.completion_tokens >= b.tokens:
            raise BudgetExhausted("max_search_tokens")
        left = b.seconds_left()
        if left is not None and left <= 0:
            raise BudgetExhausted("max_seconds")

    def _charge(self, purpose: str) -> Cost:
        cost = self.spend.cost(purpose)
        cost.calls += 1
        return cost


_USAGE = b'"usage":{'


# Where each endpoint takes its length bound, for the server's default on a relayed request.
LENGTH_FIELDS: dict[Endpoint, str] = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
    "messages": "max_tokens",
}


def _tokens(usage: dict[str, Any] | None) -> int:
    """Prompt and completion tokens of a usage, in OpenAI's names or the Responses and Messages APIs'."""
    usage = usage or {}
    return (usage.get("prompt_tokens") or usage.get("input_tokens") or 0) + (
        usage.get("completion_tokens") or usage.get("output_tokens") or 0
    )


def _usage_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """The usage an event carries: its own, or its response's or message's (Responses, Messages)."""
    if isinstance(event.get("usage"), dict):
        return event["usage"]
    inner = event.get("response") or event.get("message") or {}
    return inner.get("usage") if isinstance(inner, dict) else None


def _is_batch(prompt: list[int] | list[list[int]] | str) -> TypeGuard[list[list[int]]]:
    return bool(prompt) and isinstance(prompt, list) and isinstance(prompt[0], list)


# Typed as typeshed types asyncio.gather, so that two calls of different kinds keep their result types: two
# calls as a pair (the list returned unpacks alike), any other number as a list.
@overload
async def run_together(first: Coroutine[Any, Any, T1], second: Coroutine[Any, Any, T2], /) -> tuple[T1, T2]: ...
@overload
async def run_together(*work: Coroutine[Any, Any, T]) -> list[T]: ...
async def run_together(*work: Coroutine[Any, Any, Any]) -> Sequence[Any]:
    """Run a policy's engine calls concurrently; the first failure cancels the rest (no engine work is left
    running for a request that has failed) and is raised as itself, not as an exception group."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in work]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [t.result() for t in tasks]
