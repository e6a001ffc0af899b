"""The FastAPI application: lifespan-managed backend (embedded or external), probes and metrics.

The OpenAI endpoints live in `openai_api.py`, the API's description (/openapi.json, /v1/refine/policies) in
`discovery.py`; everything they share is in the `Runtime` (`runtime.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from refine_server.auth import KeyRing
from refine_server.backend import Backend
from refine_server.config import Settings
from refine_server.contract.protocol import (
    EVENTS_DIR_ENV,
    LIMITS_ENV,
    SECRET_ENV,
    SRGEN_ENGINE_ENV,
    TOKEN_STATS,
    EngineLink,
    events_dir,
)
from refine_server.discovery import install_openapi
from refine_server.discovery import router as discovery_router
from refine_server.engine import EmbeddedEngine, EngineSpec
from refine_server.engine_fields import check_allow_list
from refine_server.errors import install_handlers
from refine_server.gatekeeping.engine_priority import Priorities
from refine_server.gatekeeping.gatekeeper import Gatekeeper
from refine_server.gatekeeping.key_budgets import KeyMetrics
from refine_server.gatekeeping.plain_first import PlainFirst
from refine_server.gatekeeping.policy_slots import Admission
from refine_server.metrics import Metrics
from refine_server.models.resolve import resolve_model
from refine_server.openai_api import router as openai_router
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry
from refine_server.runtime import Runtime, get_runtime
from refine_server.shutdown_signal import on_shutdown_signal
from refine_server.tracing import Tracing
from refine_server.upstreams import Upstreams
from refine_server.warmup import WarmUp

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)


def engine_link(settings: Settings) -> EngineLink:
    """How refine talks to its engine plugin: the shared secret (a fresh one per start in embedded mode,
    where refine hands it to the engine it starts) and the events folder."""
    secret = settings.engine_secret.get_secret_value() if settings.engine_secret else None
    if secret is None and not settings.backend_url:
        secret = secrets.token_hex(32)
    return EngineLink(secret=secret, events_dir=settings.engine_events_dir or events_dir())


def embedded_engine(settings: Settings, registry: PolicyRegistry, link: EngineLink, metrics: Metrics) -> EmbeddedEngine:
    """The engine for `settings.model`; an unknown model raises `UnknownModel` here, at start."""
    model = resolve_model(settings.model)
    name = settings.served_model_name or model.name
    spec = EngineSpec(
        model_dir=model.folder,
        bundled=model.bundled,
        install_model=settings.model_install,
        cache_dir=settings.cache_dir,
        served_model_name=name,
        port=settings.engine_port,
        max_model_len=settings.engine_max_model_len,
        kv_cache_gib=settings.engine_kv_cache_gib,
        extra_args=list(settings.engine_args),
        # Only a bundled model's parser is known; for a folder the operator names it in --engine-args.
        tool_call_parser=model.bundled.tool_call_parser if model.bundled else None,
        priority_scheduling=settings.sends_priority(),
        # The plugin enforces the same caps as the proxy, verifies the proxy's signature, and writes its
        # events where the proxy reads them.
        plugin_env={
            SECRET_ENV: link.secret or "",
            LIMITS_ENV: json.dumps(
                {
                    **{name: registry.limits(name).model_dump() for name in registry.names},
                    TOKEN_STATS: settings.confidence_stop_limits.model_dump(),
                }
            ),
            EVENTS_DIR_ENV: str(link.events_dir),
            SRGEN_ENGINE_ENV: settings.srgen_engine.model_dump_json(),
        },
    )
    return EmbeddedEngine(spec, metrics, start_timeout_s=settings.engine_start_timeout_s)


def create_app(
    settings: Settings, registry: PolicyRegistry | None = None, *, span_exporter: SpanExporter | None = None
) -> FastAPI:
    """`span_exporter`: trace into it (tests: the SDK's InMemorySpanExporter) whatever the settings say."""
    registry = registry or PolicyRegistry(BUILTIN_POLICIES, settings.policy_limits, settings.policy_options())
    registry.get(settings.default_policy)  # an unknown default policy fails at start-up
    open_engine_fields = check_allow_list(settings.client_engine_fields)
    metrics = Metrics(registry.metrics())
    keys = KeyRing(settings.api_keys, registry, KeyMetrics(metrics.registry))
    gatekeeper = Gatekeeper(
        Admission(registry.names, settings.policy_concurrency, settings.policy_queue_timeout, metrics.registry),
        Priorities(registry.names, settings.policy_priority, send=settings.sends_priority()),
        settings.answer_tokens_default(),
        PlainFirst(settings.plain_first_wait_s, metrics.registry),
    )
    link = engine_link(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Tracing's provider is per process: each --workers worker sets up its own here. None: tracing off.
        tracing = app.state.tracing = Tracing.start(settings, span_exporter)
        engine = None if settings.backend_url else embedded_engine(settings, registry, link, metrics)
        if engine:
            engine.start()
            backends = [
                Backend(
                    engine.url,
                    metrics,
                    link,
                    timeout_s=settings.upstream_timeout_s,
                    readiness=engine.is_ready,
                    readiness_reason=lambda: engine.reason,
                )
            ]
        else:
            backends = [
                Backend(url, metrics, link, timeout_s=settings.upstream_timeout_s) for url in settings.backend_url
            ]
        upstreams = Upstreams(backends, metrics)
        upstreams.start()
        warm_up = WarmUp(registry, enabled=settings.warm_up)
        warm_up.start(upstreams)
        runtime = app.state.runtime = Runtime(
            settings, registry, metrics, upstreams, engine, keys, open_engine_fields, gatekeeper, warm_up
        )
        try:
            with on_shutdown_signal(runtime.begin_shutdown):
                yield
        finally:
            # First of all: a load balancer that probes now must stop sending requests here (the signal's hook
            # has done it already when shutdown came from one).
            runtime.begin_shutdown()
            await warm_up.aclose()
            await upstreams.aclose()
            if engine:
                await engine.stop()
            if tracing is not None:
                app.state.tracing = None
                await asyncio.to_thread(tracing.shutdown)  # exports what is left

    app = FastAPI(title="refine", version="0.1.0", lifespan=lifespan)
    app.state.tracing = None
    install_handlers(app)
    app.include_router(openai_router)
    app.include_router(discovery_router)
    install_openapi(app, registry)

    # Each probe under its old name and under Kubernetes' (/livez, /readyz).
    @app.get("/health")
    @app.get("/livez")
    async def health() -> dict[str, str]:
        """Liveness: refine's own process answers. Says nothing about the backend (see /ready)."""
        return {"status": "ok"}

    @app.get("/ready")
    @app.get("/readyz")
    async def ready(rt: Runtime = Depends(get_runtime)) -> JSONResponse:
        """Readiness: the backend is up and answers its own health check, and refine is not shutting down."""
        if rt.stopping:
            return JSONResponse({"status": "not_ready", "reason": "shutting down"}, status_code=503)
        backend = await rt.upstreams.ready()
        if backend is not None:
            return JSONResponse({"status": "ready", "backend": backend.base_url})
        first = rt.upstreams.first
        reason = first.unavailable_reason() if not first.is_ready() else "backend health check failed"
        return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics(rt: Runtime = Depends(get_runtime)) -> Response:
        """refine's metrics; in embedded mode followed by the child vLLM's, so one scrape target serves both."""
        body = rt.metrics.exposition()
        # One backend's only: two vLLMs' expositions side by side would repeat every series.
        single = len(rt.upstreams.replicas) == 1
        if single and (rt.engine is not None or rt.settings.backend_metrics) and rt.upstreams.first.is_ready():
            body += (await rt.upstreams.first.engine_metrics()).encode()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
