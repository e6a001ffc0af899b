"""The engine priority of a request's engine calls: plain requests before policies' calls.

vLLM schedules first come, first served unless it runs with `--scheduling-policy priority`; then a lower
`priority` value is scheduled earlier (and, when the KV cache is short, the highest value is preempted
first). refine's embedded engine runs so. A request's engine calls all carry the priority of its policy: the
key's own setting (`policy_priority` on its entry), else the server's, else `PLAIN_PRIORITY` for plain
requests (policy none) and `POLICY_PRIORITY` for every other policy. An engine that does not schedule by
priority is sent none (`Settings.sends_priority`): vLLM documents a priority other than 0 there as an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from refine_server.config import PLAIN_PRIORITY, POLICY_PRIORITY

PLAIN_POLICY = "none"


class Priorities:
    def __init__(self, policies: Iterable[str], configured: Mapping[str, int], *, send: bool):
        names = set(policies)
        unknown = set(configured) - names
        if unknown:
            raise ValueError(f"policy_priority names unknown policies: {sorted(unknown)}")
        self._send = send
        self._by_policy = {
            name: configured.get(name, PLAIN_PRIORITY if name == PLAIN_POLICY else POLICY_PRIORITY) for name in names
        }

    def of(self, policy: str, key_priorities: Mapping[str, int]) -> int | None:
        """The priority of `policy`'s engine calls for a key with `key_priorities`; None: send none."""
        if not self._send:
            return None
        return key_priorities.get(policy, self._by_policy[policy])
