"""The contract between the proxy and refine's engine plugin, importable without torch or vLLM.

Requests reach the plugin through vLLM's `vllm_xargs` (a flat dict of strings and numbers). Events flow back
through an append-only JSON-lines file per request in a folder both sides can see: the plugin writes one
`admitted` line when a sequence enters the engine, then one line per event; the proxy reads the file when
the response ends and deletes it. A missing file therefore means "the engine could not report" (another
host, no plugin), never "nothing happened".
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# `vllm_xargs` keys.
POLICY_ARG = "refine_policy"  # the in-engine policy a request wants
PARAMS_ARG = "refine_params"  # that policy's parameters, as one JSON string
REQUEST_KEY_ARG = "refine_request_key"  # names the request's event file

# The plugin rejects an unknown in-engine policy with a message that starts with this marker and its
# version; a vLLM without the plugin ignores the argument and generates. That difference is the handshake.
PLUGIN_MARKER = "refine engine plugin"
HANDSHAKE_POLICY = "__handshake__"

EVENTS_DIR_ENV = "REFINE_ENGINE_EVENTS_DIR"
_KEY = re.compile(r"^[0-9a-f]{32}$")


def events_dir() -> Path:
    """Where event files live: $REFINE_ENGINE_EVENTS_DIR, else a fixed folder under the system temp dir."""
    return Path(os.environ.get(EVENTS_DIR_ENV) or Path(tempfile.gettempdir()) / "refine-engine-events")


def is_request_key(key: object) -> bool:
    return isinstance(key, str) and bool(_KEY.match(key))


def append_event(key: str, event: dict[str, Any]) -> None:
    """Engine side. The key is checked, so a request can never make the plugin write outside the folder."""
    if not is_request_key(key):
        raise ValueError(f"bad request key {key!r}")
    folder = events_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event, separators=(",", ":")) + "\n")


def read_events(key: str) -> list[dict[str, Any]] | None:
    """Proxy side: every event so far, or None when the engine never reported for this key."""
    try:
        text = (events_dir() / f"{key}.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    # Only complete lines: the engine appends while a stream is still running.
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def discard_events(key: str) -> None:
    (events_dir() / f"{key}.jsonl").unlink(missing_ok=True)
