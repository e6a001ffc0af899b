"""What a generation request passes once its policy is known, before the policy runs, and what it settles
when it ends: the API key's budgets, a slot of the policy (policy_slots.py), the fields every engine call
of the request carries (its length bound and engine priority), and the pacing of a heavy request's engine
calls behind plain traffic (plain_first.py).

The route calls `Gatekeeper.admit` once the policy is chosen, builds each `EngineClient` with the ticket's
`fields` and shows it to `Ticket.track`, and calls `Ticket.finish` exactly once when the request is over
(answered, failed or abandoned): that frees the slot and charges the key for the engine tokens spent.
"""

from __future__ import annotations

from dataclasses import replace

from starlette.types import Receive

from refine_server.auth import Grant
from refine_server.disconnect import cancel_on_disconnect
from refine_server.gatekeeping.engine_priority import PLAIN_POLICY, Priorities
from refine_server.gatekeeping.plain_first import CallPacer, PlainFirst
from refine_server.gatekeeping.policy_slots import Admission, Slot
from refine_server.policies.call_fields import CallFields
from refine_server.policies.engine_client import EngineClient


class Ticket:
    """One admitted request: its slot, its engine calls' fields, the engine clients that spent its tokens."""

    def __init__(self, slot: Slot, fields: CallFields, grant: Grant, pacer: CallPacer | None, plain: PlainFirst | None):
        self._slot = slot
        self._nested_slot: Slot | None = None  # a slot of the policy this one runs inside it (auto's escalation)
        self.fields = fields
        self._grant = grant
        self.pacer = pacer  # paces this request's engine calls behind plain traffic (None: they go at once)
        self._plain = plain  # set for a plain request: it counts as plain traffic until it finishes
        self._engines: list[EngineClient] = []
        self._finished = False

    def track(self, engine: EngineClient) -> EngineClient:
        """Count `engine`'s calls against the key (a request has one per replica it was tried on)."""
        self._engines.append(engine)
        return engine

    def holds_nested_slot(self) -> bool:
        return self._nested_slot is not None

    def hold_nested_slot(self, slot: Slot) -> None:
        """Hold `slot` (of the policy run inside this request's) until the request finishes."""
        self._nested_slot = slot

    def engine_tokens(self) -> int:
        return sum(engine.engine_tokens() for engine in self._engines)

    def finish(self) -> None:
        """The request is over: the slot goes to the next waiter, the key pays for the tokens. Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._slot.release()
        if self._nested_slot is not None:
            self._nested_slot.release()
        if self._plain is not None:
            self._plain.plain_finished()
        if self.pacer is not None:
            self.pacer.finish()
        if self._grant.budget is not None:
            self._grant.budget.charge_tokens(self.engine_tokens())


class Gatekeeper:
    def __init__(self, admission: Admission, priorities: Priorities, default_max_tokens: int, plain_first: PlainFirst):
        self.admission = admission
        self.priorities = priorities
        self.plain_first = plain_first
        self._default_max_tokens = default_max_tokens

    async def admit(self, policy: str, grant: Grant, receive: Receive) -> Ticket:
        """The key's budget taken (a 429 when spent), then a slot of `policy`, waited for in turn with the
        key's other requests (a 429 after the queue timeout, a 503 once shutdown begins). A client that
        disconnects while waiting leaves the queue at once (ClientDisconnected)."""
        if grant.budget is not None:
            grant.budget.admit()
        slot = self.admission.try_enter(policy)
        if slot is None:
            slot = await cancel_on_disconnect(receive, self.admission.enter(policy, grant.name))
        fields = CallFields(
            max_tokens=self._default_max_tokens,
            priority=self.priorities.of(policy, grant.priorities),
            count_stream_usage=grant.budget is not None and grant.budget.counts_tokens,
        )
        plain = None
        if policy == PLAIN_POLICY:
            plain = self.plain_first
            plain.plain_started()
        return Ticket(slot, fields, grant, self.plain_first.pacer(policy), plain)

    async def admit_nested(self, ticket: Ticket, policy: str, grant: Grant) -> CallFields | None:
        """For an admitted request about to run `policy` inside its own (auto's escalation): a slot of `policy`,
        waited for in turn as a request of it would wait, so its concurrency limit bounds escalations too; then
        the fields its engine calls carry (its priority). None when no slot freed within the queue timeout: the
        request keeps the answer it has. Cancelled with the request when the client goes away."""
        if not ticket.holds_nested_slot():  # a request retried on another replica keeps the slot it got
            slot = await self.admission.enter_if_free_in_time(policy, grant.name)
            if slot is None:
                return None
            ticket.hold_nested_slot(slot)
        return replace(ticket.fields, priority=self.priorities.of(policy, grant.priorities))

    def describe(self, policy: str, grant: Grant) -> dict[str, int | float | None]:
        """What GET /v1/refine/policies shows of `policy`'s admission: its limit (None: unlimited), the
        requests running and waiting now (in this worker process), the queue timeout, and the engine priority
        of the caller's requests."""
        gate = self.admission.gate(policy)
        return {
            "concurrency_limit": gate.limit,
            "running": gate.running,
            "waiting": gate.waiting,
            "queue_timeout_s": gate.timeout_s,
            "engine_priority": self.priorities.of(policy, grant.priorities),
        }

    def close(self) -> None:
        """Shutdown has begun: requests waiting for a slot get a 503 now, later ones at once."""
        self.admission.close()
