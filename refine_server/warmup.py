"""No cold first request: what a policy needs (RAIN's embedding model and tokenizers) loads in the background
as soon as a backend is ready, instead of inside the first request that uses it (a first RAIN request after a
start took 9.5 s for 4 tokens, a warm one ~3 s for 24).

Each policy's state is shown by GET /v1/refine/policies: "warm" (a policy with nothing to load is warm at
once), "pending" (waiting for a backend), "warming", "failed: <why>" (the policy then loads on first use, as
before, and its request reports the problem), or, with `warm_up` off, "off: loads on first use".
"""

from __future__ import annotations

import asyncio
import logging

from refine_server.policies import PolicyRegistry
from refine_server.upstreams import Upstreams

log = logging.getLogger(__name__)

READY_POLL_S = 1.0
OFF = "off: loads on first use"


class WarmUp:
    def __init__(self, registry: PolicyRegistry, *, enabled: bool):
        self._registry = registry
        self._enabled = enabled
        self.state = {
            name: ("pending" if enabled else OFF) if registry.get(name).warms_up else "warm" for name in registry.names
        }
        self._task: asyncio.Task[None] | None = None

    def is_warm(self, policy: str) -> bool:
        return self.state[policy] == "warm"

    def start(self, upstreams: Upstreams) -> None:
        if any(state == "pending" for state in self.state.values()):
            self._task = asyncio.create_task(self._run(upstreams), name="policy-warm-up")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, upstreams: Upstreams) -> None:
        while (backend := await upstreams.ready()) is None:
            await asyncio.sleep(READY_POLL_S)
        try:
            served = (await backend.get_json("/v1/models"))["data"]
        except Exception as exc:  # the policies then load on first use
            log.warning("policy warm-up: could not list the backend's models: %s", exc)
            served = []
        for name, state in self.state.items():
            if state != "pending":
                continue
            self.state[name] = "warming"
            try:
                await self._registry.get(name).warm_up(served)
            except Exception as exc:
                log.warning("policy %s: warm-up failed (it loads on first use): %s", name, exc)
                self.state[name] = f"failed: {exc}"
            else:
                self.state[name] = "warm"
                log.info("policy %s is warm", name)
