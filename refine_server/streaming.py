"""Server-sent events out of a policy's chunk stream, with the latency metrics only a stream can give."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from refine_server.disconnect import ClientDisconnected, cancel_on_disconnect
from refine_server.errors import APIError, from_policy_error
from refine_server.policies import PolicyError, relayed

log = logging.getLogger(__name__)

Chunk = bytes | dict[str, Any]  # the engine's JSON bytes, relayed as they came, or a chunk the policy wrote

SSE_HEADERS = {
    # Proxies in front of refine must not buffer the stream: that would destroy time-to-first-token.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"


class EventStreamResponse(Response):
    """A `text/event-stream` response that streams in the request's own task and stops for a client that
    has gone away.

    Starlette's StreamingResponse, on an ASGI server before spec 2.4 (uvicorn included), streams beside a
    disconnect listener in an anyio task group: a task group and a task switch before the first byte of
    every stream. Here the stream is the request's own work, raced against the disconnect as the wait for
    the first chunk was (`cancel_on_disconnect`), and the events are closed on the way out whatever the
    outcome, so the relay behind them counts the request (a 499 for a client that left) before this returns.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str]):
        self.status_code = 200
        self._events = events
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Nothing more can reach a client that left; the relay has counted the request.
        with contextlib.suppress(ClientDisconnected):
            await cancel_on_disconnect(receive, self._stream(send))

    async def _stream(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # a cancel that lands in `send` leaves the generator open otherwise


class Observer(Protocol):
    """A histogram's child, resolved once per stream (prometheus-client's)."""

    def observe(self, amount: float) -> None: ...


@dataclass
class StreamLatency:
    """Time to the first token, then between tokens, on one policy's histograms."""

    ttft: Observer
    itl: Observer
    started: float  # when the request arrived (perf_counter)
    last_token_at: float | None = None

    def token_sent(self) -> None:
        now = time.perf_counter()
        if self.last_token_at is None:
            self.ttft.observe(now - self.started)
        else:
            self.itl.observe(now - self.last_token_at)
        self.last_token_at = now


class RelayedRequest(Protocol):
    """What the relay needs of the request it streams (serving.GenerationServing is one)."""

    @property
    def stream_format(self) -> relayed.StreamFormat:
        """How the client's endpoint streams (choice chunks, or named events)."""
        ...

    @property
    def n_choices(self) -> int:
        """Choices in the answer: the `refine` block goes on the chunk that finishes the last of them."""
        ...

    def latency(self) -> StreamLatency: ...

    def refine_block(self) -> dict[str, Any]: ...

    async def reopen(self, failure: APIError) -> tuple[Chunk | None, AsyncGenerator[Chunk, None]]:
        """The stream again on another replica after `failure` (before its first event), or `failure` raised."""
        ...

    def finished(self, status: int) -> None:
        """The stream is over with this HTTP status (499: the client went away)."""
        ...

    def error_body(self, error: APIError) -> dict[str, Any]:
        """An error in the shape of the client's API (OpenAI's, or Anthropic's for the Messages API)."""
        ...


class ChunkRelay:
    """Turns a policy's chunks into SSE bytes.

    A chunk is either the engine's own JSON bytes (a policy that relays the stream unchanged: they go out
    as they came, and only a chunk that may finish a choice is decoded) or a dict the policy wrote; a
    relayed stream starts with `relayed.ACCEPTED`, which sends nothing. The `refine` block goes, once, on the
    chunk that finishes the last of the request's choices (n per prompt), so a client reading the stream
    finds it without waiting for anything extra. A failure mid-stream becomes a `data: {"error": ...}` line,
    which the official openai client raises as an APIError; a failure before the first event is retried on
    another replica instead, where the request can `reopen` it.
    """

    def __init__(self, first: Chunk | None, rest: AsyncGenerator[Chunk, None], request: RelayedRequest):
        self._first = first
        self._rest = rest
        self._request = request
        self._latency = request.latency()
        self._format = request.stream_format
        self._finished: set[int] = set()

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The SSE events, ended by `[DONE]`; the request is `finished` when they end or are closed."""
        status = 200
        sent_any = False
        try:
            chunk = self._first
            while chunk is not None:
                if chunk != relayed.ACCEPTED:
                    self._observe_latency(chunk)
                    yield self._with_refine_block(chunk)
                    sent_any = True
                chunk = await self._next(sent_any)
            if self._format.ends_with_done:
                yield _DONE
        except (APIError, PolicyError) as exc:
            error = from_policy_error(exc) if isinstance(exc, PolicyError) else exc
            status = error.status
            yield self._format.error_event(self._request.error_body(error))
        except asyncio.CancelledError:
            status = 499  # the client went away; the response cancelled the stream
            raise
        except Exception:
            log.exception("policy stream failed")
            status = 500
            error = APIError(500, "internal error while streaming", code="internal_error")
            yield self._format.error_event(self._request.error_body(error))
        finally:
            await self._rest.aclose()
            self._request.finished(status)

    def _observe_latency(self, chunk: Chunk) -> None:
        fmt = self._format
        if fmt.carries_tokens(chunk) if isinstance(chunk, bytes) else fmt.event_carries_tokens(chunk):
            self._latency.token_sent()

    async def _next(self, sent_any: bool) -> Chunk | None:
        """The next chunk. A backend that fails after accepting the request but before its first event has
        sent the client nothing but headers, so the request starts again on another replica (`reopen`)."""
        try:
            return await anext(self._rest, None)
        except APIError as exc:
            if sent_any:
                raise
            await self._rest.aclose()
            first, self._rest = await self._request.reopen(exc)
            return first

    def _with_refine_block(self, chunk: bytes | dict[str, Any]) -> bytes:
        """The event as the client receives it, with the refine block if it ends the answer: the chunk that
        finishes the last choice still open, or the format's final event."""
        fmt = self._format
        if isinstance(chunk, bytes):
            if not fmt.may_finish(chunk):
                return fmt.sse(chunk)
            decoded = fmt.decode_event(chunk)
            if not self._ends_answer(decoded):
                return fmt.sse(chunk)
            return fmt.encode_event({**decoded, "refine": self._request.refine_block()})
        if self._ends_answer(chunk):
            chunk = {**chunk, "refine": self._request.refine_block()}
        return fmt.encode_event(chunk)

    def _ends_answer(self, event: dict[str, Any]) -> bool:
        if self._format.named:
            return self._format.is_final(event)
        newly = relayed.finished_choices(event) - self._finished
        self._finished |= newly
        return bool(newly) and len(self._finished) == self._request.n_choices
