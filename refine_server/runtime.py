"""What the routes share, built once per server start: settings, policies, metrics, the backends, API keys.

The app's lifespan puts one `Runtime` on `app.state`; routes receive it (and the caller's `Grant`) as FastAPI
dependencies, except the generation routes, which ask `runtime_of` and the key ring themselves (openai_api.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from refine_server.auth import Grant, KeyRing
from refine_server.config import Settings
from refine_server.engine import EmbeddedEngine
from refine_server.gatekeeping.gatekeeper import Gatekeeper
from refine_server.metrics import Metrics
from refine_server.policies import PolicyRegistry
from refine_server.upstreams import Upstreams
from refine_server.warmup import WarmUp


@dataclass
class Runtime:
    settings: Settings
    registry: PolicyRegistry
    metrics: Metrics
    upstreams: Upstreams
    engine: EmbeddedEngine | None
    keys: KeyRing
    open_engine_fields: frozenset[str]  # vLLM fields closed by default that this server lets clients send
    gatekeeper: Gatekeeper  # budgets, per-policy slots and engine-call fields of each generation request
    warm_up: WarmUp  # which policies have loaded what they need
    stopping: bool = False  # set when shutdown begins: readiness answers 503 from then on

    def begin_shutdown(self) -> None:
        """Shutdown has begun: readiness says so, and requests waiting for a policy's slot get a 503 now."""
        self.stopping = True
        self.gatekeeper.close()


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


# Dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency on a worker
# thread, a thread hop per dependency per request.
async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


async def get_grant(request: Request, runtime: Runtime = Depends(get_runtime)) -> Grant:
    """The caller's API key checked, and what it may do."""
    return runtime.keys.authenticate(request)
