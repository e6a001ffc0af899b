"""The disconnect guard: the request's own task is cancelled when the client goes away, and only that cancel
becomes ClientDisconnected; a stream's events are closed before its response returns, however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from refine_server.disconnect import ClientDisconnected, cancel_on_disconnect
from refine_server.streaming import EventStreamResponse


class _Client:
    """An ASGI `receive` whose client disconnects when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_the_works_result_comes_back_and_no_watcher_is_left() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await cancel_on_disconnect(_Client().receive, work()) == 7
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_disconnect_cancels_the_work_and_becomes_client_disconnected() -> None:
    client = _Client()
    work_saw_cancel = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            work_saw_cancel.set()
            raise

    asyncio.get_running_loop().call_soon(client.gone.set)
    with pytest.raises(ClientDisconnected):
        await cancel_on_disconnect(client.receive, work())
    assert work_saw_cancel.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # taken back: the task goes on as if never cancelled
    await asyncio.sleep(0)  # and is not cancelled at its next wait


@pytest.mark.parametrize("client_leaves_too", [False, True])
async def test_a_cancel_from_outside_goes_on_as_a_cancel(client_leaves_too: bool) -> None:
    client = _Client()
    started = asyncio.Event()

    async def request() -> None:
        async def work() -> None:
            started.set()
            await asyncio.sleep(60)

        await cancel_on_disconnect(client.receive, work())

    task = asyncio.create_task(request())
    await started.wait()
    if client_leaves_too:
        client.gone.set()
        await asyncio.sleep(0)  # the watcher cancels the task first
    task.cancel()  # as a server shutting down does
    with pytest.raises(asyncio.CancelledError):
        await task


async def _events(log: list[str], count: int) -> AsyncGenerator[bytes, None]:
    try:
        for i in range(count):
            yield f"data: {i}\n\n".encode()
        log.append("done")
    finally:
        log.append("closed")


async def test_the_event_stream_sends_the_events_then_ends_the_body() -> None:
    log: list[str] = []
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = EventStreamResponse(_events(log, 2), headers={"x-refine-policy": "none"})
    await response({"type": "http"}, _Client().receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    assert log == ["done", "closed"]


async def test_a_client_that_leaves_while_a_send_waits_gets_the_events_closed_before_the_response_returns() -> None:
    """A cancel that lands in `send` (a slow client's full buffer) leaves the events' generator suspended at its
    `yield`, where only closing it runs its cleanup: the relay's, which counts the request."""
    log: list[str] = []
    client = _Client()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            client.gone.set()
            await asyncio.sleep(60)  # the socket's buffer never drains

    response = EventStreamResponse(_events(log, 3), headers={})
    await asyncio.wait_for(response({"type": "http"}, client.receive, send), timeout=5)
    assert log == ["closed"]
