"""Server-sent events out of a policy's chunk stream, with the latency metrics only a stream can give."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from refine_server.errors import APIError, from_policy_error
from refine_server.metrics import Metrics
from refine_server.policies import PolicyError

log = logging.getLogger(__name__)

SSE_HEADERS = {
    # Proxies in front of refine must not buffer the stream: that would destroy time-to-first-token.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def carries_tokens(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


class ChunkRelay:
    """Turns a policy's chunks into SSE text.

    The `refine` block goes, once, on the chunk that finishes the last of the request's choices (n per
    prompt), so a client reading the stream finds it without waiting for anything extra. A failure mid-stream becomes a
    `data: {"error": ...}` line, which the official openai client raises as an APIError.
    """

    def __init__(
        self,
        first: dict[str, Any] | None,
        rest: AsyncGenerator[dict[str, Any], None],
        *,
        n_choices: int,
        refine_block: Callable[[], dict[str, Any]],
        metrics: Metrics,
        policy_label: str,
        started: float,
        on_finish: Callable[[int], None],
    ):
        self._first = first
        self._rest = rest
        self._n_choices = n_choices
        self._refine_block = refine_block
        self._metrics = metrics
        self._policy = policy_label
        self._started = started
        self._on_finish = on_finish

    async def __aiter__(self) -> AsyncIterator[str]:
        status = 200
        finished: set[int] = set()
        last_token_at: float | None = None
        try:
            chunk = self._first
            while chunk is not None:
                if carries_tokens(chunk):
                    now = time.perf_counter()
                    if last_token_at is None:
                        self._metrics.ttft.labels(self._policy).observe(now - self._started)
                    else:
                        self._metrics.itl.labels(self._policy).observe(now - last_token_at)
                    last_token_at = now
                newly = {c.get("index", 0) for c in chunk.get("choices") or () if c.get("finish_reason")}
                if newly - finished and len(finished | newly) == self._n_choices:
                    chunk["refine"] = self._refine_block()
                finished |= newly
                yield sse(chunk)
                chunk = await anext(self._rest, None)
            yield sse("[DONE]")
        except (APIError, PolicyError) as exc:
            error = from_policy_error(exc) if isinstance(exc, PolicyError) else exc
            status = error.status
            yield sse(error.body())
        except asyncio.CancelledError:
            status = 499  # the client went away; Starlette cancelled the stream
            raise
        except Exception:
            log.exception("policy stream failed")
            status = 500
            yield sse(APIError(500, "internal error while streaming", code="internal_error").body())
        finally:
            await self._rest.aclose()
            self._on_finish(status)
