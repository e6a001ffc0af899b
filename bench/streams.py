"""One streamed generation, timed as it arrives: what the latency benches read (time to first token, gaps
between tokens, decode time per token), for both endpoints."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class TimedStream:
    started: float  # time.perf_counter() when the request was sent
    arrivals: list[float] = field(default_factory=list)  # when each chunk with text arrived
    usage: dict[str, Any] | None = None  # the usage chunk's, where the stream sent one
    trace: dict[str, Any] | None = None  # refine's trace, from the chunk that carried it
    ended: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.started if self.arrivals else float("nan")

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]


async def timed_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> TimedStream:
    """POST `body` (stream: true) to `url` (a /v1/completions or /v1/chat/completions URL) and time its chunks;
    an HTTP error status raises."""
    timed = TimedStream(time.perf_counter())
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                timed.arrivals.append(time.perf_counter())
            timed.usage = chunk.get("usage") or timed.usage
            timed.trace = (chunk.get("refine") or {}).get("trace", timed.trace)
    timed.ended = time.perf_counter()
    return timed
