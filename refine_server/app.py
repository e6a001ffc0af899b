"""The FastAPI application: lifespan-managed backend (embedded or external), health, readiness and metrics.

The OpenAI endpoints live in `openai_api.py`; everything they share is in the `Runtime` on `app.state`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from refine_server.backend import Backend
from refine_server.config import Settings
from refine_server.engine import EmbeddedEngine, EngineSpec
from refine_server.errors import APIError, install_handlers
from refine_server.metrics import Metrics
from refine_server.model_store import DEFAULT_MODEL_NAME
from refine_server.openai_api import router as openai_router
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    registry: PolicyRegistry
    metrics: Metrics
    backend: Backend
    engine: EmbeddedEngine | None

    def check_api_key(self, request: Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key, in constant time each, so timing tells nothing about which matched.
        matched = False
        for key in keys:
            matched |= secrets.compare_digest(presented, key.get_secret_value().encode())
        if not matched:
            raise APIError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
                           code="invalid_api_key")


def _embedded_engine(settings: Settings, metrics: Metrics) -> EmbeddedEngine:
    name = settings.served_model_name or (settings.model.name if settings.model else DEFAULT_MODEL_NAME)
    spec = EngineSpec(
        model_dir=settings.model,
        cache_dir=settings.cache_dir,
        served_model_name=name,
        port=settings.engine_port,
        max_model_len=settings.engine_max_model_len,
        kv_cache_gib=settings.engine_kv_cache_gib,
        extra_args=list(settings.engine_args),
    )
    return EmbeddedEngine(spec, metrics, start_timeout_s=settings.engine_start_timeout_s)


def create_app(settings: Settings, registry: PolicyRegistry | None = None) -> FastAPI:
    registry = registry or PolicyRegistry(BUILTIN_POLICIES, settings.policy_limits)
    registry.get(settings.default_policy)  # an unknown default policy fails at start-up
    metrics = Metrics(registry.names)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = None if settings.backend_url else _embedded_engine(settings, metrics)
        if engine:
            engine.start()
            backend = Backend(engine.url, metrics, timeout_s=settings.upstream_timeout_s,
                              readiness=engine.is_ready, readiness_reason=lambda: engine.reason)
        else:
            backend = Backend(settings.backend_url, metrics, timeout_s=settings.upstream_timeout_s)
        app.state.runtime = Runtime(settings, registry, metrics, backend, engine)
        try:
            yield
        finally:
            await backend.aclose()
            if engine:
                await engine.stop()

    app = FastAPI(title="refine", version="0.1.0", lifespan=lifespan)
    install_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: refine's own process answers. Says nothing about the backend (see /ready)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the backend is up and answers its own health check."""
        rt: Runtime = request.app.state.runtime
        if rt.backend.is_ready() and await rt.backend.health():
            return JSONResponse({"status": "ready", "backend": rt.backend.base_url})
        reason = rt.backend.unavailable_reason() if not rt.backend.is_ready() else "backend health check failed"
        return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """refine's metrics; in embedded mode followed by the child vLLM's, so one scrape target serves both."""
        rt: Runtime = request.app.state.runtime
        body = rt.metrics.exposition()
        if rt.engine and rt.engine.is_ready():
            body += (await rt.backend.engine_metrics()).encode()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
