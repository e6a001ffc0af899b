"""The backends refine routes to: one (the embedded engine, or one vLLM) or several (`--backend-url a,b`).

Each request goes to the least loaded healthy backend and stays there for all its engine calls, so a policy
that calls the engine many times (CyberV, RAIN) shares one prefix cache. A backend that cannot be reached is
taken out at once and probed back in; a request whose backend fails before any byte reached the client is
retried on another one (`Route`). An in-engine policy goes only to a backend whose plugin can run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import TypeVar

from refine_server.backend import Backend
from refine_server.errors import APIError
from refine_server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
PROBE_INTERVAL_S = 2.0


@dataclass
class Replica:
    backend: Backend
    healthy: bool = True  # until a call or a probe says otherwise
    in_flight: int = 0  # client requests routed here and not finished

    @property
    def usable(self) -> bool:
        return self.healthy and self.backend.is_ready()


class Upstreams:
    def __init__(self, backends: list[Backend], metrics: Metrics):
        self.replicas = [Replica(b) for b in backends]
        self._metrics = metrics
        self._turn = itertools.count()  # breaks ties between equally loaded replicas, in turn
        self._prober: asyncio.Task[None] | None = None
        for r in self.replicas:
            metrics.upstream_healthy.labels(r.backend.base_url).set(1)

    @property
    def first(self) -> Backend:
        return self.replicas[0].backend

    def start(self) -> None:
        if len(self.replicas) > 1:
            self._prober = asyncio.create_task(self._probe_forever(), name="upstream-prober")

    async def aclose(self) -> None:
        if self._prober:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for r in self.replicas:
            await r.backend.aclose()

    async def ready(self) -> Backend | None:
        """A backend that answers its health check now, or None."""
        for r in self.replicas:
            if r.usable and await r.backend.health():
                return r.backend
        return None

    def best(self, exclude: Container[int] = frozenset()) -> Replica:
        """The least loaded available replica (ties taken in turn), not one of `exclude`. A 503 when none is."""
        turn = next(self._turn)
        n = len(self.replicas)
        candidates = [
            (r.in_flight, (i - turn) % n, r) for i, r in enumerate(self.replicas) if r.usable and id(r) not in exclude
        ]
        if not candidates:
            reason = self.first.unavailable_reason() if n == 1 else "no backend is healthy"
            raise APIError(503, f"backend not ready: {reason}", code="backend_unavailable")
        return min(candidates, key=lambda c: c[:2])[2]

    def acquire(self, replica: Replica) -> None:
        replica.in_flight += 1
        self._metrics.upstream_requests.labels(replica.backend.base_url).inc()
        self._metrics.upstream_in_flight.labels(replica.backend.base_url).inc()

    def release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self._metrics.upstream_in_flight.labels(replica.backend.base_url).dec()

    def fail_over(self, replica: Replica, why: str) -> None:
        """The replica could not be reached: out until a probe finds it back."""
        self._metrics.upstream_failovers.labels(replica.backend.base_url).inc()
        if replica.healthy:
            log.warning("backend %s taken out: %s", replica.backend.base_url, why)
            replica.healthy = False
            self._metrics.upstream_healthy.labels(replica.backend.base_url).set(0)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            for r in self.replicas:
                ok = await r.backend.health()
                if ok != r.healthy:
                    log.warning("backend %s is %s", r.backend.base_url, "back" if ok else "down")
                    r.healthy = ok
                    self._metrics.upstream_healthy.labels(r.backend.base_url).set(1 if ok else 0)


class Route:
    """Where one client request runs: a replica chosen once, changed only if it fails before the answer starts."""

    def __init__(self, upstreams: Upstreams):
        self._upstreams = upstreams
        self._tried: set[int] = set()
        self.replica: Replica | None = None

    async def run(
        self, attempt: Callable[[Backend], Awaitable[T]], suits: Callable[[Backend], Awaitable[None]] | None = None
    ) -> T:
        """`attempt(backend)` on the best replica; on another when the backend could not be reached and nothing
        has been sent to the client yet (the attempt's whole result is still ahead). `suits` may refuse a
        replica by raising APIError (an in-engine policy on a backend without the plugin): the next is tried."""
        refusal: APIError | None = None
        while True:
            try:
                replica = self._upstreams.best(self._tried)
            except APIError:
                if refusal is not None:
                    raise refusal from None
                raise
            self._tried.add(id(replica))
            if suits is not None:
                try:
                    await suits(replica.backend)
                except APIError as exc:
                    if exc.status >= 500:
                        raise
                    refusal = refusal or exc
                    continue
            self.replica = replica
            self._upstreams.acquire(replica)
            try:
                return await attempt(replica.backend)
            except APIError as exc:
                self.leave(exc)

    def leave(self, failure: APIError) -> None:
        """The replica failed this request before any of the answer reached the client: take it out and let the
        next `run` pick another; or raise `failure` when the failure is not the replica's or none is left."""
        if failure.code != "backend_unavailable" or len(self._upstreams.replicas) == 1 or self.replica is None:
            raise failure
        replica = self.replica
        self.finish()
        self._upstreams.fail_over(replica, failure.message)

    def finish(self) -> None:
        """The request is over (answered, failed or abandoned): its replica carries one request less."""
        if self.replica is not None:
            self._upstreams.release(self.replica)
            self.replica = None
