"""Plain traffic first: a heavy policy's engine calls wait, for a bounded time, while plain requests run.

Concurrency limits bound how many heavy requests run; priorities order what the engine has queued. Neither
helps a plain request whose decode steps a heavy request's rows share: on an engine whose step time grows with
the rows in it (a CPU engine, or a GPU near its compute limit), every heavy row slows every plain stream. So
with `plain_first_wait_s` > 0, each engine call a policy makes (its own generation calls, not a relayed plain
request) first waits until no plain request (policy `none`) is in flight, or until that many seconds have
passed, whichever comes first. Calls already running are not interrupted: vLLM cannot pause a sequence.

The wait bounds what heavy requests lose: at most `plain_first_wait_s` per engine call, so an operator trades
heavy latency for plain latency with one number. Counts are per worker process (like the concurrency limits).
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Histogram

from refine_server.gatekeeping.engine_priority import PLAIN_POLICY
from refine_server.policies.base import LATENCY_BUCKETS


class PlainFirst:
    """Plain requests in flight in this process, and the wait a heavy engine call takes for them."""

    def __init__(self, max_wait_s: float, registry: CollectorRegistry):
        self.max_wait_s = max_wait_s
        self.waits = Histogram(
            "refine_plain_first_wait_seconds",
            "Seconds a request's engine calls waited, in all, for plain requests to finish (plain_first_wait_s)",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._plain_running = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @property
    def plain_running(self) -> int:
        return self._plain_running

    def pacer(self, policy: str) -> CallPacer | None:
        """What paces `policy`'s engine calls: None for plain requests, or when the wait is off."""
        if policy == PLAIN_POLICY or self.max_wait_s <= 0:
            return None
        return CallPacer(self, policy)

    def plain_started(self) -> None:
        self._plain_running += 1
        self._quiet.clear()

    def plain_finished(self) -> None:
        self._plain_running -= 1
        if self._plain_running == 0:
            self._quiet.set()

    async def wait_for_quiet(self) -> float:
        """Until no plain request runs, or `max_wait_s`; the seconds waited."""
        if self._quiet.is_set():
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(TimeoutError):  # waited long enough: the call goes now
            await asyncio.wait_for(self._quiet.wait(), self.max_wait_s)
        return loop.time() - started


class CallPacer:
    """One heavy request's pacing: `turn()` before each of its engine calls; `waited_s` adds them up."""

    def __init__(self, plain_first: PlainFirst, policy: str):
        self._plain_first = plain_first
        self._policy = policy
        self.waited_s = 0.0

    async def turn(self) -> None:
        self.waited_s += await self._plain_first.wait_for_quiet()

    def finish(self) -> None:
        """The request is over: its total wait goes to the histogram."""
        self._plain_first.waits.labels(self._policy).observe(self.waited_s)
