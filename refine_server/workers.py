"""Several HTTP worker processes on one port, in front of one engine.

One process relays only so many tokens per second; uvicorn's process manager runs `workers` copies of the
app on one listening socket and restarts any that dies. The embedded engine is not theirs to start: this
(the parent) process starts and supervises it once, on a thread of its own, and hands the workers its address,
secret and events folder through the REFINE_* variables they read their settings from. Metrics go through
prometheus-client's multiprocess mode, so any worker's /metrics serves the sum over all of them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading

import uvicorn
from pydantic_settings import CliApp

from refine_server.config import Settings
from refine_server.engine import EmbeddedEngine, running_on_cpu

# prometheus-client's multiprocess folder. It reads the variable when it is first imported, so this module
# imports nothing that imports it (the app, the metrics) before setting it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


CORES_PER_WORKER = 4


def worker_count(settings: Settings) -> int:
    """The operator's count, else one worker per CORES_PER_WORKER cores (1 to 4), and 1 beside an embedded CPU
    engine, which needs every core it can get. One worker relays about 25k tokens/s (~40 us each, bench/proxy.py),
    more than one vLLM streams; with more than one, every token is written to the multiprocess metrics files
    (two workers on 2 cores: 66 against 42 us per token at 16 streams)."""
    if settings.workers is not None:
        return settings.workers
    if not settings.backend_url and running_on_cpu():
        return 1
    return min(4, max(1, (os.cpu_count() or 1) // CORES_PER_WORKER))


def serve_workers(settings: Settings, workers: int) -> None:
    """Blocks until the workers stop (SIGINT / SIGTERM)."""
    metrics_dir = tempfile.mkdtemp(prefix="refine-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # the workers inherit it
    engine = _EngineThread(settings) if not settings.backend_url else None
    try:
        if engine:
            engine.start()
            os.environ.update(engine.worker_environment())
        uvicorn.run(
            "refine_server.workers:worker_app",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
    finally:
        if engine:
            engine.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_app():
    """One worker's app: the parent's settings (same command line, same environment plus the engine's)."""
    from refine_server.app import create_app

    return create_app(CliApp.run(Settings))


class _EngineThread:
    """The embedded engine's supervisor, on an event loop of its own in the parent process."""

    def __init__(self, settings: Settings):
        from refine_server.app import embedded_engine, engine_link
        from refine_server.metrics import Metrics
        from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry

        registry = PolicyRegistry(BUILTIN_POLICIES, settings.policy_limits)
        self.link = engine_link(settings)
        self.engine: EmbeddedEngine = embedded_engine(settings, registry, self.link, Metrics(registry.metrics()))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        self.engine.start()

    def worker_environment(self) -> dict[str, str]:
        """What turns a worker's settings into this engine's: external mode against it, its vLLM metrics too."""
        return {
            "REFINE_BACKEND_URL": self.engine.url,
            "REFINE_ENGINE_SECRET": self.link.secret or "",
            "REFINE_ENGINE_EVENTS_DIR": str(self.link.events_dir),
            "REFINE_BACKEND_METRICS": "true",
        }

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.engine.stop(), self._loop).result(timeout=90)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
