"""What a generation request passes before its policy runs, and settles when it ends (issue 30's admission
control), so that heavy policies cannot starve plain traffic:

- `gatekeeper.py`: the one entry point (`Gatekeeper.admit` -> `Ticket`, `Ticket.finish`);
- `policy_slots.py`: per-policy concurrency with a bounded, fair wait (a 429 with Retry-After past it);
- `key_budgets.py`: requests and engine tokens per minute per API key;
- `engine_priority.py`: the engine priority of each policy's calls (plain traffic first);
- `max_tokens.py`: the server's default length for a request that names none.
"""
