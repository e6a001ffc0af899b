"""What policies need of the server, as Protocols of their own: a transport to the engine, a tracer, a pacer.

The server (refine_server) implements both: its `Backend` is a `Transport`, its request span is a `CallTracer`.
Policies type against these and never import the server, so the dependency runs one way: the server knows
the policies, the policies know only this. A test can hand a policy any object with these methods.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from refine_server.contract.protocol import EngineLink, PluginInfo

T = TypeVar("T")


class Transport(Protocol):
    """One vLLM server, as the policies call it. Failures are raised as the server's own errors, which the
    route turns into the client's; a policy never reads an HTTP status."""

    @property
    def link(self) -> EngineLink:
        """How to reach refine's plugin inside this engine: the signing secret and the events folder."""
        ...

    async def plugin(self, model: str) -> PluginInfo | None:
        """refine's engine plugin in this backend, as its (remembered) handshake says; None: no plugin."""
        ...

    async def get_json(self, path: str) -> dict[str, Any]: ...

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]: ...

    def stream_events(
        self, path: str, body: dict[str, Any], *, endpoint: str, named: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """The stream's events as the engine sent them (their JSON bytes; `named`: each event whole, its
        `event:` line included), starting with `relayed.ACCEPTED`."""
        ...

    def stream_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's events, decoded."""
        ...


class CallTracer(Protocol):
    """Wraps each engine call a policy makes (a span per call, when the server traces)."""

    async def call(
        self, purpose: str, endpoint: str, body: dict[str, Any], send: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """One non-streaming call: runs `send()` and returns its result."""
        ...

    def stream(
        self, purpose: str, endpoint: str, body: dict[str, Any], chunks: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        """One streaming call: the same chunks, in order."""
        ...


class NoTracer:
    """The tracer when tracing is off: each call runs as it is, a stream is passed on untouched."""

    async def call(
        self, purpose: str, endpoint: str, body: dict[str, Any], send: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        return await send()

    def stream(
        self, purpose: str, endpoint: str, body: dict[str, Any], chunks: AsyncGenerator[T, None]
    ) -> AsyncGenerator[T, None]:
        return chunks


NO_TRACER = NoTracer()


class Pacer(Protocol):
    """Awaited before each generation call a policy makes: the server may hold it back for a while (plain
    traffic first, `gatekeeping/plain_first.py`)."""

    async def turn(self) -> None: ...
