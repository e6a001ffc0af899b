"""Shutdown reaches waiting requests when the signal comes, not after uvicorn has drained the requests in flight."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

from prometheus_client import CollectorRegistry

from refine_server.gatekeeping.policy_slots import Admission
from refine_server.shutdown_signal import on_shutdown_signal


async def test_the_signal_runs_the_callback_then_the_handler_installed_before() -> None:
    seen: list[str] = []

    def uvicorns(sig: int, frame: FrameType | None) -> None:
        seen.append(f"previous {signal.Signals(sig).name}")

    before = signal.signal(signal.SIGTERM, uvicorns)
    try:
        with on_shutdown_signal(lambda: seen.append("callback")):
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(0.01)  # the callback runs on the loop
        assert seen == ["previous SIGTERM", "callback"]
        assert signal.getsignal(signal.SIGTERM) is uvicorns  # restored when the app stops
    finally:
        signal.signal(signal.SIGTERM, before)


async def test_a_request_waiting_for_a_slot_gets_a_503_the_moment_shutdown_is_signalled() -> None:
    admission = Admission(["rain"], {"rain": 1}, 60.0, CollectorRegistry())
    holder = await admission.enter("rain", "a")
    before = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        with on_shutdown_signal(admission.close):
            waiter = asyncio.create_task(admission.enter("rain", "a"))
            await asyncio.sleep(0.01)
            signal.raise_signal(signal.SIGTERM)
            done, _ = await asyncio.wait([waiter], timeout=1)
        assert done and waiter.exception().status == 503  # type: ignore[union-attr]
    finally:
        signal.signal(signal.SIGTERM, before)
        holder.release()
