"""An expansion's token sets drawn together, so that sets with a common beginning compute it once.

The official code draws a level's greedy set and its 9 samples one token at a time and keeps the logits of every
state it has computed (`dicp` in HH/main.py): a sample that starts like the greedy set, or like an earlier sample,
costs nothing until it leaves them. vLLM's `n` samples are independent sequences, each computed in full, though the
samples of a small model share much of their beginnings: of the 100 tokens of SmolLM2-135M's greedy set and 9
samples of 10 tokens, 58-85 were distinct prefixes (measured on this repository's benchmark prompts).

`draw_sets` starts the greedy set as a stream that reports the distribution at every state on its way. Every draft
takes its next tokens here from those distributions: the greedy draft the path's own token, the samples a token
drawn from the top k renormalised, which is what the engine's sampler would do. A sample that leaves the path:
- alone at its new state shares nothing more, so the rest of it is generated in one call of its own, as vLLM's
  `n` would have generated it (`finish_sample`);
- with other samples at the same state: they follow a new greedy stream from there, by the same rule.
The streams and calls run at once, so the drawing takes about as many engine steps as one set; a stream that no
draft follows any more is closed, which aborts it in vLLM. Each draft samples from a random stream of its own (and
seeds its finishing call from it), so a seeded request draws the same sets whatever order the engine's answers
arrive in.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections import defaultdict
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from refine_server.policies.rain.tree import TokenSet


class PathEngine(Protocol):
    """What `draw_sets` needs of the engine (engine_calls.SearchEngine)."""

    @property
    def end_ids(self) -> frozenset[int]:
        """The ids that end the answer, as the engine stops on them."""

    def greedy_path(
        self, prompt: list[int], length: int, top_k: int
    ) -> AsyncGenerator[tuple[int, dict[int, float]], None]:
        """The greedy continuation, streamed: each token with the top-k log-probabilities at the state before it."""

    async def finish_sample(self, prompt: list[int], length: int, top_k: int, seed: int | None) -> TokenSet:
        """The rest of one sampled set, `length` tokens at most, generated in one call."""


@dataclass
class _Draft:
    greedy: bool
    rng: random.Random
    seeded: bool
    tokens: list[int] = field(default_factory=list)
    log_p: float = 0.0  # under the top-k truncated distribution, as the official code's set prior
    ended: bool = False
    rest: asyncio.Task[TokenSet] | None = None  # the rest of the set, generated in a call of its own


async def draw_sets(
    engine: PathEngine, prompt: list[int], length: int, top_k: int, samples: int, seed: int | None
) -> tuple[TokenSet, list[TokenSet]]:
    """The greedy set and `samples` sets sampled from the top-k distribution (duplicates kept: the caller
    dedupes), `length` tokens each or fewer where the answer ends, drawn together from `prompt` (see the module's
    docstring). The same `seed` draws the same sets; None draws at random."""
    drafts = [
        _Draft(greedy=i == 0, rng=random.Random(None if seed is None else f"{seed}/{i}"), seeded=seed is not None)
        for i in range(samples + 1)
    ]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_follow(engine, group, prompt, [], drafts, length, top_k))
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None  # a budget or an engine error, as itself
    sets = [_as_set(d) for d in drafts]
    return sets[0], sets[1:]


async def _follow(
    engine: PathEngine,
    group: asyncio.TaskGroup,
    prompt: list[int],
    start: list[int],
    drafts: list[_Draft],
    length: int,
    top_k: int,
) -> None:
    """Drafts that all stand at `prompt + start` follow the greedy path from there, as long as they stay on it."""
    async with aclosing(engine.greedy_path(prompt + start, length - len(start), top_k)) as path:
        async for path_token, top in path:
            ranked = sorted(top.items(), key=lambda kv: -kv[1])[:top_k]
            log_norm = math.log(sum(math.exp(lp) for _, lp in ranked))
            left: dict[tuple[int, ...], list[_Draft]] = defaultdict(list)
            for d in drafts:
                token, log_p = (path_token, top.get(path_token, ranked[0][1])) if d.greedy else _sample(ranked, d.rng)
                d.log_p += log_p - log_norm
                if token in engine.end_ids:
                    d.ended = True
                    continue
                d.tokens.append(token)
                if token != path_token:
                    left[tuple(d.tokens)].append(d)
            drafts = [d for d in drafts if not d.ended and d.tokens[-1:] == [path_token] and len(d.tokens) < length]
            for state, together in left.items():
                if len(state) == length:
                    continue
                if len(together) == 1:
                    d = together[0]
                    d.rest = group.create_task(
                        engine.finish_sample(
                            prompt + list(state),
                            length - len(state),
                            top_k,
                            d.rng.getrandbits(63) if d.seeded else None,
                        )
                    )
                else:
                    group.create_task(_follow(engine, group, prompt, list(state), together, length, top_k))
            if not drafts:
                return


def _sample(ranked: list[tuple[int, float]], rng: random.Random) -> tuple[int, float]:
    return rng.choices(ranked, weights=[math.exp(lp) for _, lp in ranked])[0]


def _as_set(draft: _Draft) -> TokenSet:
    tokens, log_p, ended = draft.tokens, draft.log_p, draft.ended
    if draft.rest is not None:
        rest = draft.rest.result()
        tokens, ended = tokens + list(rest.tokens), rest.ends_answer
        log_p += math.log(max(rest.probability, sys.float_info.min))
    return TokenSet(tuple(tokens), math.exp(log_p), greedy=draft.greedy, ends_answer=ended)
