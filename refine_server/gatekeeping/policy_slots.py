"""Admission control: how many requests of each policy run at once, and who waits for a slot, in what order
and for how long.

One RAIN request makes 4-60x the engine work of a plain one, and every policy shares one vLLM with
interactive traffic. A policy given a limit (`policy_concurrency`) runs at most that many requests at once;
the others wait in the policy's queue for at most `policy_queue_timeout` seconds, then get a 429 with
Retry-After. The queue is fair: FIFO within an API key, and keys take turns (round robin), so one key's burst
cannot hold the others' requests back. A waiter that goes away (a client disconnect cancels it) leaves the
queue at once, and a slot granted to it in the same instant passes on. When shutdown begins, every waiter
gets a 503 and nothing new waits.

asyncio.Semaphore is not used: its wake-up order is not FIFO once waiters are cancelled, and it knows
nothing of keys.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from refine_server.errors import APIError
from refine_server.policies.base import LATENCY_BUCKETS


class ShuttingDown(Exception):
    """The server has begun to shut down: no request waits for a slot any more."""


class QueueTimeout(Exception):
    def __init__(self, policy: str, waited_s: float, retry_after_s: int):
        super().__init__(f"policy {policy!r} is at its concurrency limit: no slot freed in {waited_s:g} s")
        self.retry_after_s = retry_after_s


class AdmissionMetrics:
    """Queue depth, running requests, wait times and rejections, by policy."""

    def __init__(self, registry: CollectorRegistry):
        self.waiting = Gauge(
            "refine_admission_queue_depth",
            "Requests waiting for a slot of their policy",
            ["policy"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.running = Gauge(
            "refine_admission_running",
            "Requests of each policy holding a slot",
            ["policy"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.wait = Histogram(
            "refine_admission_wait_seconds",
            "Time a request waited for a slot of its policy (0 for one that started at once)",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "refine_admission_rejections",
            "Requests refused a slot: queue_timeout (429) or shutting_down (503)",
            ["policy", "reason"],
            registry=registry,
        )


class Slot:
    """A running request's place under its policy's limit; `release` (idempotent) hands it on."""

    def __init__(self, gate: PolicyGate):
        self._gate: PolicyGate | None = gate
        self._since = time.monotonic()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(time.monotonic() - self._since)


class PolicyGate:
    """The slots of one policy (`limit` None: unlimited, still counted) and its fair queue."""

    def __init__(self, policy: str, limit: int | None, timeout_s: float, metrics: AdmissionMetrics):
        self.policy = policy
        self.limit = limit
        self.timeout_s = timeout_s
        self.running = 0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}  # FIFO per key
        self._turns: deque[str] = deque()  # keys with waiters, the next to be served first
        self._closed = False
        self._mean_hold_s: float | None = None  # how long a slot is held, smoothed: the Retry-After estimate
        self._waiting_gauge = metrics.waiting.labels(policy)
        self._running_gauge = metrics.running.labels(policy)
        self._wait = metrics.wait.labels(policy)
        self._rejected = metrics.rejected

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def try_enter(self) -> Slot | None:
        """A slot where one is free and nobody waits for it (no wait, no task switch), else None. Raises
        ShuttingDown once shutdown has begun."""
        if self._closed:
            self._rejected.labels(self.policy, "shutting_down").inc()
            raise ShuttingDown
        if self._queues or (self.limit is not None and self.running >= self.limit):
            return None
        self._take()
        self._wait.observe(0.0)
        return Slot(self)

    async def enter(self, key: str) -> Slot:
        """A slot, at once where one is free and nobody waits, else after the waiters before it in turn.
        Raises QueueTimeout after the queue timeout, ShuttingDown when shutdown begins."""
        slot = self.try_enter()
        if slot is not None:
            return slot
        started = time.monotonic()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(key, granted)
        try:
            async with asyncio.timeout(self.timeout_s):
                await granted
        except TimeoutError:
            self._dequeue(key, granted)
            if _holds(granted):  # granted in the same instant as the timeout: take it
                return self._started(started)
            self._rejected.labels(self.policy, "queue_timeout").inc()
            raise QueueTimeout(self.policy, self.timeout_s, self.retry_after_s()) from None
        except ShuttingDown:
            self._rejected.labels(self.policy, "shutting_down").inc()
            raise
        except BaseException:  # cancelled (the client went away): leave, and pass on a slot granted meanwhile
            self._dequeue(key, granted)
            if _holds(granted):
                self.release(None)
            raise
        return self._started(started)

    def release(self, held_s: float | None) -> None:
        self.running -= 1
        self._running_gauge.dec()
        if held_s is not None:
            self._mean_hold_s = held_s if self._mean_hold_s is None else 0.8 * self._mean_hold_s + 0.2 * held_s
        self._grant_next()

    def retry_after_s(self) -> int:
        """When a slot may be free: the mean time a slot is held, per request ahead (whole seconds, >= 1)."""
        if self._mean_hold_s is None or not self.limit:
            return max(1, math.ceil(self.timeout_s))
        ahead = self.waiting / self.limit + 1
        return max(1, math.ceil(self._mean_hold_s * ahead))

    def close(self) -> None:
        """Shutdown: every waiter gets ShuttingDown now, and every later `enter`."""
        self._closed = True
        for queue in self._queues.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(ShuttingDown())
        self._queues.clear()
        self._turns.clear()
        self._waiting_gauge.set(0)

    def _take(self) -> None:
        self.running += 1
        self._running_gauge.inc()

    def _started(self, since: float) -> Slot:
        self._wait.observe(time.monotonic() - since)
        return Slot(self)

    def _enqueue(self, key: str, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._turns.append(key)
        queue.append(waiter)
        self._waiting_gauge.inc()

    def _dequeue(self, key: str, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is None or waiter not in queue:
            return  # granted (and removed) already, or the queue was closed
        queue.remove(waiter)
        self._waiting_gauge.dec()
        if not queue:
            del self._queues[key]
            self._turns.remove(key)

    def _grant_next(self) -> None:
        """Free slots go to the waiters, one key's first waiter per turn."""
        while self._turns and (self.limit is None or self.running < self.limit):
            key = self._turns.popleft()
            queue = self._queues[key]
            waiter = queue.popleft()
            self._waiting_gauge.dec()
            if queue:
                self._turns.append(key)
            else:
                del self._queues[key]
            if waiter.done():  # cancelled, its task not yet run to leave the queue
                continue
            waiter.set_result(None)
            self._take()


def _holds(waiter: asyncio.Future[None]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class Admission:
    """Every policy's gate; built once per server start from `policy_concurrency`."""

    def __init__(
        self, policies: Iterable[str], limits: Mapping[str, int], timeout_s: float, registry: CollectorRegistry
    ):
        names = set(policies)
        unknown = set(limits) - names
        if unknown:
            raise ValueError(f"policy_concurrency names unknown policies: {sorted(unknown)}")
        if any(limit < 1 for limit in limits.values()):
            raise ValueError("policy_concurrency: each limit must be at least 1")
        metrics = AdmissionMetrics(registry)
        self._gates = {name: PolicyGate(name, limits.get(name), timeout_s, metrics) for name in names}

    def gate(self, policy: str) -> PolicyGate:
        return self._gates[policy]

    def try_enter(self, policy: str) -> Slot | None:
        """A free slot of `policy` taken without waiting, or None; a 503 once shutdown has begun."""
        try:
            return self._gates[policy].try_enter()
        except ShuttingDown:
            raise _shutting_down() from None

    async def enter(self, policy: str, key: str) -> Slot:
        """A slot of `policy` for a request of API key `key` (its name); an OpenAI-style 429 with Retry-After
        when none frees in time, a 503 once shutdown has begun."""
        try:
            return await self._gates[policy].enter(key)
        except QueueTimeout as exc:
            raise APIError(
                429,
                f"{exc}; retry after {exc.retry_after_s} s",
                code="policy_busy",
                param="refine.policy",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from None
        except ShuttingDown:
            raise _shutting_down() from None

    async def enter_if_free_in_time(self, policy: str, key: str) -> Slot | None:
        """A slot of `policy`, waited for as `enter` waits; None (no error) when none freed in time or shutdown
        began: for a request that has an answer already and would only improve it (`auto`'s escalation)."""
        try:
            return await self._gates[policy].enter(key)
        except (QueueTimeout, ShuttingDown):
            return None

    def close(self) -> None:
        """Shutdown has begun: waiters answered with 503 now, and nothing waits from here on."""
        for gate in self._gates.values():
            gate.close()


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="shutting_down")
