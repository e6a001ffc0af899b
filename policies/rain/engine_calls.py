"""What RAIN asks of the engine, in token ids end to end.

Every generation goes to vLLM's /v1/completions with a token-id prompt (the committed prefix plus the path
being explored), so nothing is re-tokenised between steps and vLLM's prefix cache sees the same ids every
time. Texts exist only where the method needs words: the self-evaluation prompt and the embeddings, made
with the serving model's own tokenizer (`Tokenizer`: its files read locally when refine can see them,
vLLM's /tokenize and /detokenize otherwise).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_server.policies.engine_client import Budget, EngineClient, Spend, run_together
from refine_server.policies.rain.set_drawing import draw_sets
from refine_server.policies.rain.tree import TokenSet

ROLLOUT_STOPS = [",", ".", "?", ":", ";", "\n"]  # a rollout runs to the next punctuation
MAX_LOGPROBS = 20  # vLLM's default cap on top logprobs per token


@dataclass(frozen=True)
class LocalTokenizer:
    """A served model's tokenizer, read from its own files on this machine."""

    tokenizer: Any  # transformers' tokenizer
    end_ids: frozenset[int]  # where vLLM ends an answer: the tokenizer's end-of-sequence id, the generation config's


class Tokenizer:
    """One served model's tokenizer, for one request. A search encodes and decodes hundreds of texts per
    answer token; with the model's own tokenizer files (`local`, see `load_local_tokenizer`) that costs no
    round trip, otherwise each is a /tokenize or /detokenize call to vLLM."""

    def __init__(self, client: EngineClient, model: str, local: LocalTokenizer | None = None):
        self.client = client
        self.model = model
        self.local = local

    @property
    def where(self) -> str:
        return "local" if self.local is not None else "engine"

    async def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        if self.local is not None:
            return self.local.tokenizer.encode(text, add_special_tokens=special_tokens)
        return await self.client.tokenize(text, special_tokens=special_tokens, model=self.model)

    async def decode(self, tokens: list[int]) -> str:
        if self.local is not None:
            return self.local.tokenizer.decode(tokens)  # as vLLM's /detokenize: special tokens kept
        return await self.client.detokenize(tokens, model=self.model)


async def load_local_tokenizer(root: str | None) -> LocalTokenizer | None:
    """The tokenizer in the folder vLLM loaded a model from (its /v1/models `root`), if this machine has that
    folder: the embedded engine's model always, a separate backend's when it runs here on a local path.
    None when it is not a local folder with tokenizer files (a hub name, another machine)."""
    if not root or not (Path(root) / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer, GenerationConfig
    except ImportError:
        return None

    def load() -> LocalTokenizer:
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        ends = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
        if (Path(root) / "generation_config.json").is_file():
            configured = GenerationConfig.from_pretrained(root, local_files_only=True).eos_token_id
            if configured is not None:
                ends.update(configured if isinstance(configured, list) else [configured])
        return LocalTokenizer(tokenizer, frozenset(ends))

    return await asyncio.to_thread(load)


class SearchEngine:
    """The engine calls RAIN's search makes, in token ids, through the request's `EngineClient` (which
    counts their cost by purpose and enforces the search budget)."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer):
        self.client = client
        self.tokenizer = tokenizer
        self._texts: dict[tuple[int, ...], str] = {}
        self.set_tokens = 0  # the tokens of the multi-token sets expansions made: what vLLM's `n` would generate

    @property
    def budget(self) -> Budget:
        assert self.client.budget is not None, "RainRun gives the request its budget before the search"
        return self.client.budget

    @property
    def spend(self) -> Spend:
        return self.client.spend

    # ---- the tokenizer -----------------------------------------------------------------------------------

    async def tokenize(self, text: str, *, special_tokens: bool = False) -> list[int]:
        return await self.tokenizer.encode(text, special_tokens=special_tokens)

    async def tokenize_chat(self, messages: list[dict[str, Any]], template_fields: dict[str, Any]) -> list[int]:
        return await self.client.tokenize_chat(messages, template_fields)

    async def text(self, tokens: Sequence[int]) -> str:
        """The text of some token ids, remembered: the search asks for the same prefixes again and again."""
        key = tuple(tokens)
        if not key:
            return ""
        if key not in self._texts:
            self._texts[key] = await self.tokenizer.decode(list(key))
        return self._texts[key]

    # ---- generation --------------------------------------------------------------------------------------

    async def top_tokens(self, prompt: list[int], k: int) -> list[TokenSet]:
        """The k most likely next tokens, probabilities renormalised over those k (RAIN's single-token sets)."""
        choice = (await self._complete("expand", prompt, max_tokens=1, temperature=0.0, logprobs=min(k, MAX_LOGPROBS)))[
            0
        ]
        top = _token_logprobs(choice["logprobs"]["top_logprobs"][0])
        ranked = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        total = sum(math.exp(lp) for _, lp in ranked)
        return [TokenSet((token,), math.exp(lp) / total, greedy=(i == 0)) for i, (token, lp) in enumerate(ranked)]

    async def expansion_sets(
        self, prompt: list[int], length: int, top_k: int, samples: int, together: bool
    ) -> tuple[TokenSet, list[TokenSet]]:
        """A multi-token level's children: the greedy set and `samples` sets sampled from the top-k distribution
        (duplicates kept). `together`: drawn together (`set_drawing.draw_sets`), where the model's end-of-sequence
        ids are known here; otherwise in two calls, the samples as vLLM's `n`."""
        if not together or self.tokenizer.local is None:
            greedy, sampled = await run_together(
                self.greedy_set(prompt, length, top_k), self.sampled_sets(prompt, length, top_k, samples)
            )
        else:
            greedy, sampled = await draw_sets(self, prompt, length, top_k, samples, self.client.next_seed())
        self.set_tokens += sum(len(s.tokens) + s.ends_answer for s in (greedy, *sampled))
        return greedy, sampled

    @property
    def end_ids(self) -> frozenset[int]:
        return self.tokenizer.local.end_ids if self.tokenizer.local is not None else frozenset()

    async def greedy_path(
        self, prompt: list[int], length: int, top_k: int
    ) -> AsyncGenerator[tuple[int, dict[int, float]], None]:
        """The greedy continuation of `prompt`, `length` tokens at most, streamed: each token with the top-k
        log-probabilities at the state before it. Leaving early aborts the rest in vLLM."""
        chunks = self.client.stream_completions(
            "expand",
            prompt,
            max_tokens=length,
            temperature=0.0,
            logprobs=top_k,
            return_token_ids=True,
            return_tokens_as_token_ids=True,
        )
        async with aclosing(chunks):
            async for event in chunks:
                for choice in event.get("choices") or ():
                    tops = (choice.get("logprobs") or {}).get("top_logprobs") or ()
                    for token, top in zip(choice.get("token_ids") or (), tops, strict=True):
                        yield token, _token_logprobs(top)

    async def finish_sample(self, prompt: list[int], length: int, top_k: int, seed: int | None) -> TokenSet:
        return (await self.sampled_sets(prompt, length, top_k, 1, seed=seed))[0]

    async def greedy_set(self, prompt: list[int], length: int, top_k: int) -> TokenSet:
        choice = (await self._complete("expand", prompt, max_tokens=length, temperature=0.0, logprobs=top_k))[0]
        return _token_set(choice, top_k, greedy=True)

    async def sampled_sets(
        self, prompt: list[int], length: int, top_k: int, n: int, purpose: str = "expand", seed: int | None = None
    ) -> list[TokenSet]:
        """n sets sampled from the top-k truncated distribution (duplicates kept: the caller dedupes); seeded with
        `seed`, or the request's next seed."""
        choices = await self._complete(
            purpose,
            prompt,
            max_tokens=length,
            temperature=1.0,
            top_k=top_k,
            logprobs=top_k,
            n=n,
            seed=self.client.next_seed() if seed is None else seed,
        )
        return [_token_set(c, top_k) for c in choices]

    async def rollout(self, prompt: list[int], max_tokens: int, *, to_end: bool = False) -> list[int]:
        """Sample from the full distribution until the text ends at punctuation (or the answer ends), or with
        `to_end` until the answer ends (the official truthful script's rollout).

        Streamed so it can stop where the official code does, at the first token after which the text ends
        in one of ROLLOUT_STOPS (vLLM's own stop strings allow only four, and match anywhere in a token);
        leaving the stream closes the connection, which aborts the rest in vLLM. The end-of-sequence token
        is not returned.
        """
        tokens: list[int] = []
        text = ""
        chunks = self.client.stream_completions(
            "rollout",
            prompt,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=self.client.next_seed(),
            return_token_ids=True,
        )
        async with aclosing(chunks):
            async for event in chunks:
                for choice in event.get("choices") or ():
                    tokens.extend(choice.get("token_ids") or ())
                    text += choice.get("text") or ""
                    if choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None and tokens:
                        tokens.pop()  # the end-of-sequence token
                if not to_end and text.endswith(tuple(ROLLOUT_STOPS)):
                    break
        return tokens

    async def judge(self, prompts: list[list[int]], options: tuple[int, int], model: str) -> list[tuple[float, float]]:
        """log P(first option), log P(second option) as the next token of each prompt, in one call to the
        judging model (the client's, or the request's `judge_model`)."""
        choices = await self._complete(
            "evaluate", prompts, max_tokens=1, temperature=0.0, logprobs=1, logprob_token_ids=list(options), model=model
        )
        result = []
        for choice in sorted(choices, key=lambda c: c["index"]):
            top = _token_logprobs(choice["logprobs"]["top_logprobs"][0])
            result.append((top.get(options[0], -math.inf), top.get(options[1], -math.inf)))
        return result

    def stream_plain(self, prompt: list[int], sampling: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Plain decoding from `prompt` with the client's own sampling, as a stream of completion chunks:
        how an answer is finished once the search budget has run out."""
        return self.client.stream_completions("finish", prompt, budgeted=False, return_token_ids=True, **sampling)

    async def _complete(self, purpose: str, prompt: list[int] | list[list[int]], **fields: Any) -> list[dict]:
        result = await self.client.completions(
            purpose, prompt, return_token_ids=True, return_tokens_as_token_ids=True, **fields
        )
        return result["choices"]


def _token_logprobs(top: dict[str, float]) -> dict[int, float]:
    """top_logprobs keyed "token_id:N" (return_tokens_as_token_ids) -> {N: logprob}."""
    return {int(key.rsplit(":", 1)[1]): lp for key, lp in top.items()}


def _without_eos(choice: dict[str, Any]) -> tuple[list[int], bool]:
    """The generated ids without a final end-of-sequence token, and whether there was one.

    vLLM reports an end-of-sequence stop as finish_reason "stop" with no stop_reason (a stop string or a
    stop token id would be named there); the end-of-sequence id is then the last of `token_ids`.
    """
    tokens = list(choice["token_ids"])
    ended = choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None
    if ended and tokens:
        tokens = tokens[:-1]
    return tokens, ended


def _token_set(choice: dict[str, Any], top_k: int, greedy: bool = False) -> TokenSet:
    """A generated set with its probability under the top-k truncated distribution: the product over its
    tokens of p(token) / sum of the top-k p at that step (vLLM reports logprobs of the raw distribution)."""
    log_p = 0.0
    for chosen, top in zip(choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], strict=True):
        ranked = sorted(top.values(), reverse=True)[:top_k]
        log_p += chosen - math.log(sum(math.exp(lp) for lp in ranked))
    tokens, ended = _without_eos(choice)
    return TokenSet(tuple(tokens), math.exp(log_p), greedy=greedy, ends_answer=ended)
