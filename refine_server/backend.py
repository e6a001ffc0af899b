"""The HTTP client for the vLLM OpenAI server behind refine: pooled connections, real streaming, typed failures."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

import httpx

from refine_server.engine_protocol import HANDSHAKE_POLICY, PLUGIN_MARKER, POLICY_ARG
from refine_server.errors import APIError
from refine_server.metrics import Metrics


class Backend:
    """One vLLM server. `ready` is what refine last learned about it; `is_ready` may ask a supervisor too."""

    def __init__(
        self,
        base_url: str,
        metrics: Metrics,
        *,
        timeout_s: float,
        readiness: Callable[[], bool] | None = None,
        readiness_reason: Callable[[], str] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._metrics = metrics
        self._readiness = readiness
        self._readiness_reason = readiness_reason
        self._plugin_version: str | None = None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # ---- state -------------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._readiness() if self._readiness else True

    def unavailable_reason(self) -> str:
        return self._readiness_reason() if self._readiness_reason else "backend unavailable"

    def _require_ready(self) -> None:
        if not self.is_ready():
            raise APIError(503, f"backend not ready: {self.unavailable_reason()}", code="backend_unavailable")

    async def health(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def served_models(self) -> list[str]:
        data = await self.get_json("/v1/models")
        return [m["id"] for m in data.get("data", [])]

    async def engine_metrics(self) -> str:
        """The backend's own Prometheus exposition, or "" when it cannot be scraped right now."""
        try:
            resp = await self._client.get("/metrics", timeout=5.0)
        except httpx.HTTPError:
            return ""
        return resp.text if resp.status_code == 200 else ""

    async def plugin_version(self, model: str) -> str | None:
        """The version of refine's engine plugin inside this backend, or None if the plugin is not loaded.

        Asked once per backend and remembered; a restarted embedded engine is the same install.
        """
        if self._plugin_version is None:
            body = {
                "model": model,
                "prompt": "x",
                "max_tokens": 1,
                "vllm_xargs": {POLICY_ARG: HANDSHAKE_POLICY},
            }
            try:
                await self.post_json("/v1/completions", body, endpoint="handshake")
                return None
            except APIError as exc:
                if exc.status != 400 or PLUGIN_MARKER not in exc.message:
                    raise
                self._plugin_version = exc.message.split(PLUGIN_MARKER, 1)[1].split(":", 1)[0].strip()
        return self._plugin_version

    # ---- calls -------------------------------------------------------------------------------------------

    async def get_json(self, path: str) -> dict[str, Any]:
        self._require_ready()
        try:
            resp = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, "models") from exc
        if resp.status_code >= 400:
            raise _error_from_response(resp.status_code, resp.content)
        return resp.json()

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        """One non-streaming call. Raises APIError carrying the backend's own status and message."""
        self._require_ready()
        started = time.perf_counter()
        try:
            resp = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, endpoint) from exc
        finally:
            self._metrics.upstream_latency.labels(endpoint).observe(time.perf_counter() - started)
        if resp.status_code >= 400:
            self._count_error(endpoint, resp.status_code)
            raise _error_from_response(resp.status_code, resp.content)
        return resp.json()

    async def stream_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> AsyncIterator[dict[str, Any]]:
        """One streaming call, yielding each server-sent event's JSON as it arrives.

        Leaving the loop early (a client that went away, a policy that has seen enough) closes the
        connection, which makes vLLM abort the generation.
        """
        self._require_ready()
        started = time.perf_counter()
        try:
            async with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    self._count_error(endpoint, resp.status_code)
                    raise _error_from_response(resp.status_code, await resp.aread())
                self._metrics.upstream_latency.labels(endpoint).observe(time.perf_counter() - started)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        self._count_error(endpoint, 500)
                        raise _error_from_body(502, event)
                    yield event
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, endpoint) from exc

    def _count_error(self, endpoint: str, status: int | str) -> None:
        self._metrics.upstream_errors.labels(endpoint, str(status)).inc()

    def _transport_error(self, exc: httpx.HTTPError, endpoint: str) -> APIError:
        if isinstance(exc, httpx.TimeoutException):
            self._count_error(endpoint, "timeout")
            return APIError(504, "backend timed out", code="backend_timeout")
        self._count_error(endpoint, "connection")
        reason = self.unavailable_reason() if not self.is_ready() else f"{type(exc).__name__}"
        return APIError(503, f"backend unavailable: {reason}", code="backend_unavailable")


def _error_from_response(status: int, content: bytes) -> APIError:
    try:
        payload = json.loads(content)
    except ValueError:
        payload = {}
    return _error_from_body(status, payload if isinstance(payload, dict) else {})


def _error_from_body(status: int, payload: dict[str, Any]) -> APIError:
    """Keep the backend's own message (vLLM already explains bad input well) under refine's status rules."""
    err = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    message = str(err.get("message") or err.get("detail") or f"backend returned HTTP {status}")
    if status >= 500:
        # A backend crash is refine's gateway problem, not the client's: 502, message kept for debugging.
        return APIError(502, f"backend error: {message}", code="backend_error")
    return APIError(status, message, param=err.get("param"), code=err.get("code") and str(err.get("code")))
