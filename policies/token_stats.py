"""Per-token statistics measured inside the engine, the proxy side: ask for them, read them back per choice.

The engine plugin's sensor (`engine_plugin/sensor.py`) measures, for every token a request samples, the
next-token distribution it was drawn from, over the whole vocabulary at the request's temperature (T = 1 for
greedy requests): entropy and varentropy (nats), top-2 margin, and the drawn token's probability; and, at
T = 1, DeepConf's token confidence over the request's top k. They reach this process as a binary file per
request (`contract/token_stats_file.py`), not as JSON per token.

A request may also ask the engine to stop a sequence whose confidence falls (`TokenStatsParams.stop`, DeepConf's
online stop, `engine_plugin/confidence_stop.py`): the sequence then ends with end-of-sequence like any other
(finish_reason "stop"), and its statistics say where (`ChoiceTokenStats.stopped_at`).

How a policy uses them (through its `EngineClient`):

    reason = await call.engine.token_stats_unavailable()   # None: this backend reports them
    if reason is None:
        response, stats = await call.engine.chat_with_token_stats("round1", messages, n=8, temperature=1.0)
        stats[0].entropy      # one float per completion token of choice 0, aligned with its token_ids
        stop = ConfidenceStopParams(threshold=s, window=64)
        response, stats = await call.engine.chat_with_token_stats(
            "trace", messages, sensor=TokenStatsParams(confidence_k=20, stop=stop)
        )
        stats[0].confidence, stats[0].stopped_at   # C_j per token; where the stop forced EOS (None: never)
    else:
        ...                   # fall back to top_logprobs; `reason` says why

`chat_with_token_stats` / `completions_with_token_stats` take the same fields as `chat` / `completions`, add
`return_token_ids` (each choice then carries its `token_ids`), take the keyword `sensor` (what to ask of the
sensor: None = k 20, no stop) and raise `TokenStatsUnavailable` on a backend without the sensor. A stop whose
window exceeds the engine's cap (its handshake's `limits["token_stats"]`) is a PolicyRequestError (a 400
naming `refine.window`). Prefix caching stays on: the statistics need no hidden states.

n > 1: each choice is its own engine sequence, numbered by the engine in admission order, which need not be the
choice index; a sequence is given to the choice whose token ids it drew (statistics of identical token
sequences from one prompt are the same distributions).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refine_server.contract.params import ConfidenceStopLimits, LimitExceeded, TokenStatsParams, enforce_limits
from refine_server.contract.protocol import REQUEST_KEY_ARG, TOKEN_STATS, signed_xargs
from refine_server.contract.token_stats_file import STOP_WAIVED, STOPPED, StatsRecord, discard_stats, read_stats
from refine_server.policies.base import PolicyRequestError

if TYPE_CHECKING:
    from refine_server.policies.engine_client import EngineClient

# The engine writes a step's records a moment after the step (off the sampler's thread), so a finished
# response may arrive before its last records: wait for them this long at most, then report them missing.
RECORDS_WAIT_S = 5.0
_POLL_S = 0.005


class TokenStatsUnavailable(Exception):
    """The backend cannot report token statistics (the message says why): fall back to top_logprobs."""


@dataclass(frozen=True)
class ChoiceTokenStats:
    """One choice's statistics, index j describing the distribution its token j was drawn from."""

    token_ids: list[int]  # the choice's completion tokens (what the lists are aligned with)
    entropy: list[float]  # nats, at the request's temperature (1 for greedy requests)
    varentropy: list[float]  # variance of the surprisal -log p, nats^2
    margin: list[float]  # p_top1 - p_top2
    prob: list[float]  # probability of the token drawn, token_ids[j]
    confidence: list[float]  # -(1/k) * sum of the k largest log p at T = 1 (DeepConf's token confidence)
    missing: int  # tokens the engine reported nothing for (NaN in every list); 0 normally
    stopped_at: int | None = None  # index of the token the confidence stop forced (EOS); None: never stopped
    # The engine ran the sequence without its stop (every stop slot was taken, `max_stop_sequences`).
    stop_waived: bool = False

    def summary(self) -> dict[str, Any]:
        """Mean and max entropy over the tokens reported, and how many tokens there are."""
        known = [h for h in self.entropy if not math.isnan(h)]
        return {
            "tokens": len(self.token_ids),
            "mean_entropy": round(sum(known) / len(known), 4) if known else None,
            "max_entropy": round(max(known), 4) if known else None,
            **({"missing": self.missing} if self.missing else {}),
        }


async def unavailable_reason(engine: EngineClient) -> str | None:
    """Why the engine behind `engine` cannot report token statistics to this proxy, or None when it can.
    Uses the backend's handshake, which is remembered for a while: cheap to ask before every call."""
    problem = await engine.plugin_problem(TOKEN_STATS, "report token statistics")
    if problem is None:
        plugin = await engine.plugin()
        assert plugin is not None  # plugin_problem reports a missing plugin
        if not plugin.events_shared:
            problem = "the engine's files do not reach this proxy (do refine and vLLM share engine_events_dir?)"
    return problem


async def measure(
    engine: EngineClient,
    body: dict[str, Any],
    send: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    sensor: TokenStatsParams | None = None,
) -> tuple[dict[str, Any], dict[int, ChoiceTokenStats]]:
    """`send(body)` with the sensor switched on, asked for `sensor` (None: the defaults, no stop); the response
    and each choice's statistics by choice index. The response's choices carry `token_ids`. Raises
    TokenStatsUnavailable where the backend cannot report, PolicyRequestError for a stop over its caps."""
    reason = await unavailable_reason(engine)
    if reason is not None:
        raise TokenStatsUnavailable(reason)
    sensor = TokenStatsParams.model_validate(sensor.model_dump()) if sensor is not None else TokenStatsParams()
    await _enforce_engine_caps(engine, sensor)
    xargs = signed_xargs(engine.link.secret or "", TOKEN_STATS, sensor.model_dump_json(exclude_none=True))
    key = xargs[REQUEST_KEY_ARG]
    folder = engine.link.events_dir
    # The body's own vllm_xargs (the client's, where the operator opened keys) travel alongside refine's.
    sent = {**body, "vllm_xargs": {**(body.get("vllm_xargs") or {}), **xargs}, "return_token_ids": True}
    try:
        result = await send(sent)
        choices = {c.get("index", 0): list(c.get("token_ids") or ()) for c in result.get("choices") or ()}
        return result, await read_choices(folder, key, choices)
    finally:
        discard_stats(folder, key)


async def _enforce_engine_caps(engine: EngineClient, sensor: TokenStatsParams) -> None:
    """The stop's caps as the engine enforces them (its handshake's copy of the server's
    `confidence_stop_limits`): refused here with the proxy's own 400 rather than the engine's."""
    if sensor.stop is None:
        return
    plugin = await engine.plugin()
    caps = ConfidenceStopLimits.model_validate(plugin.handshake.limits.get(TOKEN_STATS, {})) if plugin else None
    try:
        enforce_limits(sensor.stop, *([caps] if caps else []))
    except LimitExceeded as exc:
        raise PolicyRequestError(f"the engine's confidence stop: {exc}", f"refine.{exc.param}") from None


async def read_choices(
    folder: Path, key: str, choices: dict[int, list[int]], wait_s: float = RECORDS_WAIT_S
) -> dict[int, ChoiceTokenStats]:
    """Each choice's statistics from the request's file, once every token of every choice has its record (or
    `wait_s` has passed: what is still missing is reported as such)."""
    deadline = time.monotonic() + wait_s
    while True:
        final = time.monotonic() >= deadline
        matched = match_choices(choices, read_stats(folder, key) or {}, final=final)
        if matched is not None:
            return matched
        await asyncio.sleep(_POLL_S)


def match_choices(
    choices: dict[int, list[int]], sequences: dict[int, dict[int, StatsRecord]], *, final: bool
) -> dict[int, ChoiceTokenStats] | None:
    """Give each choice the engine sequence that drew its tokens. None while some choice's tokens are not all
    recorded yet (unless `final`: then they are reported missing).

    A sequence may have drawn more tokens than its choice shows (vLLM stops at a stop string after the engine
    drew on), so a choice matches a sequence whose recorded tokens agree with it wherever both have one. Longer
    choices pick first, and among agreeing sequences the best covered, then the closest in length."""
    free = dict(sequences)
    matched: dict[int, ChoiceTokenStats] = {}
    for index, ids in sorted(choices.items(), key=lambda item: (-len(item[1]), item[0])):
        best, best_rank = None, None
        for ordinal, records in free.items():
            if any(j in records and records[j].token_id != t for j, t in enumerate(ids)):
                continue
            covered = sum(1 for j in range(len(ids)) if j in records)
            rank = (covered, -abs(len(records) - len(ids)), -ordinal)
            if best_rank is None or rank > best_rank:
                best, best_rank = ordinal, rank
        if (best_rank is None or best_rank[0] < len(ids)) and not final:
            return None
        matched[index] = _choice_stats(ids, free.pop(best) if best is not None else {})
    return matched


def _choice_stats(ids: list[int], records: dict[int, StatsRecord]) -> ChoiceTokenStats:
    rows = [records.get(j) for j in range(len(ids))]
    nan = math.nan
    return ChoiceTokenStats(
        token_ids=ids,
        entropy=[r.entropy if r else nan for r in rows],
        varentropy=[r.varentropy if r else nan for r in rows],
        margin=[r.margin if r else nan for r in rows],
        prob=[r.prob if r else nan for r in rows],
        confidence=[r.confidence if r else nan for r in rows],
        missing=sum(1 for r in rows if r is None),
        stopped_at=next((j for j, r in enumerate(rows) if r is not None and r.stopped == STOPPED), None),
        stop_waived=any(r is not None and r.stopped == STOP_WAIVED for r in rows),
    )
