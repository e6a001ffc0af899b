"""Stop work for a client that has gone away.

The ASGI server tells of a disconnect only through `receive()` (uvicorn drops what is sent after it in
silence), so the work of a request, the wait for a stream's first chunk, and then the stream itself, is raced
against the `http.disconnect` message: the client winning cancels the work, which closes the backend
connection and makes vLLM abort the generation.

The work runs in the caller's own task and a watcher task cancels it (as `asyncio.timeout` does), rather than
the work in a task of its own: that would cost each request a task and two task switches before its first
byte (bench/proxy.py's added time-to-first-token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, or ClientDisconnected once the work has been cancelled because the client went away.
    `receive`: the request's ASGI receive, its body read already."""
    task = asyncio.current_task()
    assert task is not None  # called from a coroutine, which runs in a task
    watcher = asyncio.create_task(_cancel_when_disconnected(receive, task))
    try:
        return await work
    except asyncio.CancelledError:
        # The watcher's own cancel is taken back and becomes ClientDisconnected. Any other (the server
        # shutting down) goes on, also when it came together with the watcher's.
        if _cancelled_by(watcher) and task.uncancel() == 0:
            raise ClientDisconnected from None
        raise
    finally:
        watcher.cancel()


async def _cancel_when_disconnected(receive: Receive, task: asyncio.Task[object]) -> None:
    """Cancel `task` when the client disconnects: the only way this returns."""
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def _cancelled_by(watcher: asyncio.Task[None]) -> bool:
    return watcher.done() and not watcher.cancelled() and watcher.exception() is None
