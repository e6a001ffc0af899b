"""Act the moment shutdown is asked for, not once the server has drained.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the requests in flight before it runs
the app's lifespan shutdown; a request waiting for a policy's slot would sit out its queue timeout first.
`on_shutdown_signal` chains a callback before the handler already installed (uvicorn's), for as long as the
app runs, so waiting requests are answered (503) at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_shutdown_signal(callback: Callable[[], None]) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM first schedule `callback` on the running loop, then reach the
    handler installed before. Off the main thread (where signals cannot be handled) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def handle(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        before = previous[sig]
        if callable(before):
            before(sig, frame)
        else:  # the default action (or none): as if this handler had never been installed
            signal.signal(sig, before if before is not None else signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before if before is not None else signal.SIG_DFL)
