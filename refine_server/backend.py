"""The HTTP client for the vLLM OpenAI server behind refine: pooled connections, real streaming, typed failures.

It is aiohttp's, for its C HTTP parser: relaying a stream with it took half the CPU per token that httpx's
pure-Python HTTP/1.1 took (bench/proxy.py, README), and the relay is what refine does most.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import aiohttp
import msgspec

from refine_server.contract.protocol import (
    HANDSHAKE_POLICY,
    PROTOCOL_VERSION,
    REQUEST_KEY_ARG,
    EngineLink,
    PluginInfo,
    discard_events,
    parse_handshake_reply,
    read_events,
    signed_xargs,
)
from refine_server.errors import APIError
from refine_server.metrics import Metrics
from refine_server.policies.relayed import ACCEPTED
from refine_server.tracing import outgoing_headers

# How long a handshake's answer (plugin or none) is trusted: an external vLLM can be redeployed with or
# without the plugin, and asking again costs one rejected request.
HANDSHAKE_TTL_S = 60.0
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_JSON = {"Content-Type": "application/json"}
# What a call can fail with short of an HTTP answer: no connection, a dropped one, a timeout.
_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class Backend:
    """One vLLM server. `ready` is what refine last learned about it; `is_ready` may ask a supervisor too."""

    def __init__(
        self,
        base_url: str,
        metrics: Metrics,
        link: EngineLink,
        *,
        timeout_s: float,
        readiness: Callable[[], bool] | None = None,
        readiness_reason: Callable[[], str] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._metrics = metrics
        self._readiness = readiness
        self._readiness_reason = readiness_reason
        self.link = link
        self._plugin: tuple[float, PluginInfo | None] | None = None  # (asked at, answer)
        # Each read may wait timeout_s (a long generation streams, a long non-streaming call waits), connecting 5 s.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the event loop

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Idle connections are dropped before uvicorn's (vLLM's) 5 s keep-alive closes them under us.
            connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

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
            async with self._http().get(self.base_url + "/health", timeout=_PROBE_TIMEOUT) as resp:
                return resp.status == 200
        except _TRANSPORT_ERRORS:
            return False

    async def engine_metrics(self) -> str:
        """The backend's own Prometheus exposition, or "" when it cannot be scraped right now."""
        try:
            async with self._http().get(self.base_url + "/metrics", timeout=_PROBE_TIMEOUT) as resp:
                return await resp.text() if resp.status == 200 else ""
        except _TRANSPORT_ERRORS:
            return ""

    async def plugin(self, model: str) -> PluginInfo | None:
        """refine's engine plugin inside this backend, or None when the backend has none. Remembered for
        HANDSHAKE_TTL_S, whichever the answer; a backend that cannot answer now is asked again next time."""
        if self._plugin is not None and time.monotonic() - self._plugin[0] < HANDSHAKE_TTL_S:
            return self._plugin[1]
        xargs = signed_xargs(self.link.secret or "", HANDSHAKE_POLICY, "{}")
        body = {"model": model, "prompt": "x", "max_tokens": 1, "vllm_xargs": xargs}
        try:
            await self.post_json("/v1/completions", body, endpoint="handshake")
            info = None  # the argument was ignored and a token generated: no plugin
        except APIError as exc:
            if exc.status != 400:
                raise
            info = self._plugin_info(exc.message, xargs[REQUEST_KEY_ARG])
        finally:
            discard_events(self.link.events_dir, xargs[REQUEST_KEY_ARG])
        self._plugin = (time.monotonic(), info)
        return info

    def _plugin_info(self, refusal: str, key: str) -> PluginInfo | None:
        """What a 400 answer to the handshake says: the plugin's reply, or no plugin (a server that refuses
        the request without a reply, such as one that accepts no `vllm_xargs`)."""
        try:
            handshake = parse_handshake_reply(refusal)
        except ValueError:
            raise _plugin_mismatch("its handshake reply is in a form this proxy does not read") from None
        if handshake is None:
            return None
        if handshake.protocol != PROTOCOL_VERSION:
            raise _plugin_mismatch(f"it speaks protocol {handshake.protocol}, this proxy {PROTOCOL_VERSION}")
        return PluginInfo(handshake, events_shared=read_events(self.link.events_dir, key) is not None)

    # ---- calls -------------------------------------------------------------------------------------------

    async def get_json(self, path: str) -> dict[str, Any]:
        self._require_ready()
        try:
            async with self._http().get(self.base_url + path, headers=outgoing_headers()) as resp:
                content = await resp.read()
        except _TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, "models") from exc
        if resp.status >= 400:
            raise _error_from_response(resp.status, content)
        return msgspec.json.decode(content)

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        """One non-streaming call. Raises APIError carrying the backend's own status and message."""
        self._require_ready()
        started = time.perf_counter()
        try:
            async with self._post(path, body) as resp:
                content = await resp.read()
        except _TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, endpoint) from exc
        finally:
            self._metrics.upstream_latency.labels(endpoint).observe(time.perf_counter() - started)
        if resp.status >= 400:
            self._count_error(endpoint, resp.status)
            raise _error_from_response(resp.status, content)
        return msgspec.json.decode(content)

    async def stream_events(
        self, path: str, body: dict[str, Any], *, endpoint: str, named: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """One streaming call, yielding each server-sent event's data (its JSON, as bytes, as the backend sent
        it) as it arrives: relaying it unchanged costs no decoding. `named`: the endpoint names its events
        (Responses, Messages), and each is yielded whole, its `event:` line included. An error event is raised
        as APIError. The first item is `ACCEPTED` (empty): the backend has answered 200 and the stream is open,
        though no event may have come yet (vLLM answers at once and streams once prefill is done).

        Leaving the loop early (a client that went away, a policy that has seen enough) closes the
        connection, which makes vLLM abort the generation.
        """
        self._require_ready()
        started = time.perf_counter()
        try:
            async with self._post(path, body) as resp:
                if resp.status >= 400:
                    self._count_error(endpoint, resp.status)
                    raise _error_from_response(resp.status, await resp.read())
                self._metrics.upstream_latency.labels(endpoint).observe(time.perf_counter() - started)
                yield ACCEPTED
                pending = b""
                async for data in resp.content.iter_any():
                    if b"\r" in data:  # SSE allows CRLF line ends; vLLM sends LF
                        data = data.replace(b"\r\n", b"\n")
                    pending += data
                    *events, pending = pending.split(b"\n\n")
                    for event in events:
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data:"):
                                continue
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                return
                            if payload.startswith((b'{"error"', b'{"type":"error"')):
                                self._count_error(endpoint, 500)
                                raise _error_from_body(502, msgspec.json.decode(payload))
                            yield event if named else payload
        except _TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, endpoint) from exc

    async def stream_json(
        self, path: str, body: dict[str, Any], *, endpoint: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        """`stream_events`, each event's JSON decoded: for policies that read the stream."""
        async with aclosing(self.stream_events(path, body, endpoint=endpoint)) as events:
            async for payload in events:
                if payload != ACCEPTED:
                    yield msgspec.json.decode(payload)

    def _post(self, path: str, body: dict[str, Any]) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        trace = outgoing_headers()  # W3C traceparent for vLLM while tracing is on; None when off
        headers = _JSON if trace is None else {**_JSON, **trace}
        return self._http().post(self.base_url + path, data=msgspec.json.encode(body), headers=headers)

    def _count_error(self, endpoint: str, status: int | str) -> None:
        self._metrics.upstream_errors.labels(endpoint, str(status)).inc()

    def _transport_error(self, exc: Exception, endpoint: str) -> APIError:
        if isinstance(exc, asyncio.TimeoutError):
            self._count_error(endpoint, "timeout")
            return APIError(504, "backend timed out", code="backend_timeout")
        self._count_error(endpoint, "connection")
        reason = self.unavailable_reason() if not self.is_ready() else f"{type(exc).__name__}"
        return APIError(503, f"backend unavailable: {reason}", code="backend_unavailable")


def _plugin_mismatch(problem: str) -> APIError:
    return APIError(
        502,
        f"the backend's refine engine plugin does not match this refine: {problem} (install "
        "the same refine version in the engine's environment)",
        code="engine_plugin_mismatch",
    )


def _error_from_response(status: int, content: bytes) -> APIError:
    try:
        payload = msgspec.json.decode(content)
    except ValueError:
        payload = {}
    return _error_from_body(status, payload if isinstance(payload, dict) else {})


def _error_from_body(status: int, payload: dict[str, Any]) -> APIError:
    """Keep the backend's own message (vLLM already explains bad input well) under refine's status rules."""
    error = payload.get("error")
    err: dict[str, Any] = error if isinstance(error, dict) else payload
    message = str(err.get("message") or err.get("detail") or f"backend returned HTTP {status}")
    if status >= 500:
        # A backend crash is refine's gateway problem, not the client's: 502, message kept for debugging.
        return APIError(502, f"backend error: {message}", code="backend_error")
    return APIError(status, message, param=err.get("param"), code=err.get("code") and str(err.get("code")))
