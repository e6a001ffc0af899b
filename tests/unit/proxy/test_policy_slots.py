"""Per-policy admission without a server: slots, the fair queue (FIFO per key, keys in turn), the bounded wait,
waiters that leave, and shutdown."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from refine_server.errors import APIError
from refine_server.gatekeeping.policy_slots import Admission, QueueTimeout, Slot


def _admission(limit: int | None = 1, timeout_s: float = 5.0) -> tuple[Admission, CollectorRegistry]:
    registry = CollectorRegistry()
    return Admission(["heavy", "plain"], {"heavy": limit} if limit else {}, timeout_s, registry), registry


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_queued_request_starts_when_a_slot_frees() -> None:
    admission, registry = _admission(limit=1)
    gate = admission.gate("heavy")
    first = await gate.enter("a")
    second = asyncio.create_task(gate.enter("a"))
    await _settle()
    assert not second.done() and gate.waiting == 1 and gate.running == 1
    assert _value(registry, "refine_admission_queue_depth", policy="heavy") == 1
    first.release()
    slot = await asyncio.wait_for(second, 1)
    assert isinstance(slot, Slot) and gate.running == 1 and gate.waiting == 0
    assert _value(registry, "refine_admission_queue_depth", policy="heavy") == 0
    slot.release()
    slot.release()  # idempotent: the slot is not given back twice
    assert gate.running == 0


async def test_waiters_of_one_key_go_in_order_and_keys_take_turns() -> None:
    gate = _admission(limit=1)[0].gate("heavy")
    holder = await gate.enter("burst")
    started: list[str] = []

    async def request(key: str, label: str) -> None:
        slot = await gate.enter(key)
        started.append(label)
        await asyncio.sleep(0)
        slot.release()

    # One key queues a burst of three, then another key one request: it goes second, not fourth.
    tasks = [asyncio.create_task(request("burst", f"burst{i}")) for i in range(3)]
    await _settle()
    tasks.append(asyncio.create_task(request("other", "other")))
    await _settle()
    holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert started == ["burst0", "other", "burst1", "burst2"]


async def test_a_request_that_cannot_start_in_time_gets_queue_timeout_with_a_retry_after() -> None:
    admission, registry = _admission(limit=1, timeout_s=0.05)
    gate = admission.gate("heavy")
    holder = await gate.enter("a")
    with pytest.raises(QueueTimeout) as err:
        await gate.enter("a")
    assert err.value.retry_after_s >= 1 and gate.waiting == 0
    assert _value(registry, "refine_admission_rejections_total", policy="heavy", reason="queue_timeout") == 1
    # Through `Admission`: the client's error, a 429 in OpenAI's shape with Retry-After.
    with pytest.raises(APIError) as api_err:
        await admission.enter("heavy", "a")
    assert api_err.value.status == 429 and api_err.value.headers == {"Retry-After": str(gate.retry_after_s())}
    assert api_err.value.body()["error"]["type"] == "rate_limit_error"
    holder.release()


async def test_retry_after_follows_how_long_slots_are_held() -> None:
    gate = _admission(limit=1, timeout_s=0.01)[0].gate("heavy")
    assert gate.retry_after_s() == 1  # nothing known yet: the queue timeout, at least 1 s
    gate.try_enter()
    gate.release(held_s=8.0)
    assert gate.retry_after_s() == 8


async def test_a_waiter_that_is_cancelled_leaves_the_queue_at_once() -> None:
    admission, registry = _admission(limit=1)
    gate = admission.gate("heavy")
    holder = await gate.enter("a")
    leaving = asyncio.create_task(gate.enter("a"))
    staying = asyncio.create_task(gate.enter("b"))
    await _settle()
    assert gate.waiting == 2
    leaving.cancel()  # as a client disconnect cancels the request's task
    await _settle()
    assert gate.waiting == 1 and _value(registry, "refine_admission_queue_depth", policy="heavy") == 1
    holder.release()
    slot = await asyncio.wait_for(staying, 1)
    assert gate.running == 1
    slot.release()


async def test_a_slot_granted_to_a_waiter_cancelled_in_the_same_instant_passes_on() -> None:
    gate = _admission(limit=1)[0].gate("heavy")
    holder = await gate.enter("a")
    unlucky = asyncio.create_task(gate.enter("a"))
    next_one = asyncio.create_task(gate.enter("a"))
    await _settle()
    holder.release()  # grants `unlucky` its slot...
    unlucky.cancel()  # ...and it is cancelled before it could run
    await _settle()
    assert unlucky.cancelled()
    slot = await asyncio.wait_for(next_one, 1)
    assert gate.running == 1 and gate.waiting == 0
    slot.release()
    assert gate.running == 0


async def test_shutdown_answers_waiters_at_once_and_refuses_later_requests() -> None:
    admission, registry = _admission(limit=1, timeout_s=60)
    holder = await admission.enter("heavy", "a")
    waiters = [asyncio.create_task(admission.enter("heavy", key)) for key in ("a", "b")]
    await _settle()
    admission.close()
    for waiter in waiters:
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(waiter, 1)
        assert err.value.status == 503
    for policy in ("heavy", "plain"):  # nothing waits after shutdown, limited or not
        with pytest.raises(APIError):
            await admission.enter(policy, "a")
    assert _value(registry, "refine_admission_queue_depth", policy="heavy") == 0
    assert _value(registry, "refine_admission_rejections_total", policy="heavy", reason="shutting_down") == 3
    holder.release()


async def test_an_unlimited_policy_never_waits_but_counts_what_runs() -> None:
    gate = _admission(limit=None)[0].gate("heavy")
    slots = [gate.try_enter() for _ in range(50)]
    assert all(isinstance(s, Slot) for s in slots) and gate.running == 50 and gate.limit is None


def test_limits_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match="unknown policies"):
        Admission(["none"], {"nosuch": 1}, 1.0, CollectorRegistry())
    with pytest.raises(ValueError, match="at least 1"):
        Admission(["none"], {"none": 0}, 1.0, CollectorRegistry())
