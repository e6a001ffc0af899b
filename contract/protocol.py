"""The contract between the proxy and refine's engine plugin, importable without torch or vLLM.

**Requests** reach the plugin through vLLM's `vllm_xargs` (a flat dict of strings and numbers), under keys
that start with `refine_`. Only the proxy may set them: each in-engine request carries a random key and an
HMAC of (key, policy, parameters) made with a secret that the proxy and the engine share
(`REFINE_ENGINE_SECRET` in both environments; generated per start in embedded mode). The plugin refuses a
request without a valid signature, so a client that reaches vLLM's port directly cannot switch a policy on,
and it checks the parameters against its own copy of the server's caps (`REFINE_ENGINE_POLICY_LIMITS`).

**The handshake**: the proxy sends a signed 1-token request for the pseudo-policy `HANDSHAKE_POLICY`; the
plugin refuses it at admission (so nothing is generated), after writing one event under the request's key.
vLLM relays a refusal as a 400 whose message is the plugin's text, the only thing a logits-processor plugin can
say to a client, so the reply is that text in a fixed form: `handshake_reply` writes it (the plugin's
`Handshake`, with `PROTOCOL_VERSION`), `parse_handshake_reply` reads it. A vLLM without the plugin ignores the
argument and generates; a server that refuses the request without that reply has no plugin either.

**Events** flow back through an append-only JSON-lines file per request key in a folder both sides can see
(`REFINE_ENGINE_EVENTS_DIR`): one `admitted` line when a sequence enters the engine, then one line per event;
the proxy reads the file when the response ends and deletes it. A missing file therefore means "the engine
could not report" (another host, no shared folder), never "nothing happened"; the handshake says in advance
whether the folder is shared. Token statistics use a binary file per request key in the same folder
(`token_stats_file.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from pydantic import BaseModel

# `vllm_xargs` keys. Every key with this prefix is refine's: the proxy refuses them from clients.
RESERVED_XARGS_PREFIX = "refine_"
POLICY_ARG = "refine_policy"  # the in-engine policy a request wants
PARAMS_ARG = "refine_params"  # that policy's parameters, as one JSON string
REQUEST_KEY_ARG = "refine_request_key"  # names the request's event file
SIGNATURE_ARG = "refine_signature"  # HMAC-SHA256 of the three above, with the shared secret
# Makes the in-engine work fail on purpose, for tests; honoured only by an engine started with ALLOW_FAULTS_ENV=1.
FAULT_ARG = "refine_fault"

PLUGIN_MARKER = "refine engine plugin"  # starts every message the plugin sends through vLLM
HANDSHAKE_POLICY = "__handshake__"
# Not a policy but a sensor: the engine reports per-token statistics of the request's own distribution
# (engine_plugin/sensor.py; the proxy reads them with policies/token_stats.py). A plugin that offers it
# lists it among its handshake's `policies`.
TOKEN_STATS = "token_stats"
HANDSHAKE_REPLY = f"{PLUGIN_MARKER} handshake reply: "
# Bumped when a field of this contract changes meaning: a proxy refuses a plugin of another protocol version.
PROTOCOL_VERSION = 2  # 2: token confidence and the confidence stop in the statistics

SECRET_ENV = "REFINE_ENGINE_SECRET"
LIMITS_ENV = "REFINE_ENGINE_POLICY_LIMITS"
EVENTS_DIR_ENV = "REFINE_ENGINE_EVENTS_DIR"
SRGEN_ENGINE_ENV = "REFINE_ENGINE_SRGEN"  # JSON of SRGenEngineSettings
TOKEN_STATS_ENGINE_ENV = "REFINE_ENGINE_TOKEN_STATS"  # JSON of TokenStatsEngineSettings
ALLOW_FAULTS_ENV = "REFINE_ENGINE_ALLOW_FAULTS"
_KEY = re.compile(r"^[0-9a-f]{32}$")


class Handshake(BaseModel):
    """What the plugin tells the proxy about itself."""

    protocol: int  # PROTOCOL_VERSION of the plugin's side
    version: str  # the refine package version installed in the engine
    policies: list[str]  # the in-engine policies it runs; TOKEN_STATS only where this engine can report them
    signature: str  # "ok", "no secret" (the engine has none set) or "mismatch" (not the proxy's secret)
    limits: dict[str, dict[str, Any]]  # the caps the plugin enforces, by policy
    unsupported: list[str]  # why this engine cannot run in-engine policies correctly (empty: it can)


@dataclass(frozen=True)
class EngineLink:
    """What the proxy shares with the engine plugin of its backend: the signing secret and the events folder."""

    secret: str | None
    events_dir: Path


@dataclass(frozen=True)
class PluginInfo:
    """The handshake's result, proxy side: the plugin's own report, and whether its event files reach the proxy."""

    handshake: Handshake
    events_shared: bool


def handshake_reply(report: Handshake) -> str:
    """Engine side: the refusal message that answers a handshake."""
    return HANDSHAKE_REPLY + report.model_dump_json()


def parse_handshake_reply(message: str) -> Handshake | None:
    """Proxy side: the plugin's report from the message of the 400 that vLLM relayed, or None when the
    message is no handshake reply. Raises ValueError for a reply in a form this side cannot read."""
    at = message.find(HANDSHAKE_REPLY)
    if at < 0:
        return None
    report, _ = json.JSONDecoder().raw_decode(message, at + len(HANDSHAKE_REPLY))
    return Handshake.model_validate(report)  # a pydantic ValidationError is a ValueError


# ---- signing ----------------------------------------------------------------------------------------------


def new_request_key() -> str:
    return secrets.token_hex(16)


def is_request_key(key: object) -> TypeGuard[str]:
    return isinstance(key, str) and bool(_KEY.match(key))


def signature(secret: str, key: str, policy: str, params_json: str) -> str:
    message = "\n".join((key, policy, params_json)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_xargs(secret: str, policy: str, params_json: str, key: str | None = None) -> dict[str, str]:
    """Proxy side: the `vllm_xargs` that ask the plugin to run `policy` with these parameters."""
    key = key or new_request_key()
    return {
        POLICY_ARG: policy,
        PARAMS_ARG: params_json,
        REQUEST_KEY_ARG: key,
        SIGNATURE_ARG: signature(secret, key, policy, params_json),
    }


def check_signature(args: dict[str, Any], secret: str | None) -> str:
    """Engine side: "ok", "no secret" or "mismatch" for a request's refine arguments."""
    if not secret:
        return "no secret"
    expected = signature(
        secret, str(args.get(REQUEST_KEY_ARG)), str(args.get(POLICY_ARG)), str(args.get(PARAMS_ARG, "{}"))
    )
    return "ok" if hmac.compare_digest(expected, str(args.get(SIGNATURE_ARG, ""))) else "mismatch"


def engine_secret() -> str | None:
    return os.environ.get(SECRET_ENV) or None


def engine_policy_limits() -> dict[str, dict[str, Any]]:
    """The caps the operator handed the engine; an unreadable value is a start-up error, not "no caps"."""
    raw = os.environ.get(LIMITS_ENV)
    if not raw:
        return {}
    limits = json.loads(raw)
    if not isinstance(limits, dict):
        raise ValueError(f"{LIMITS_ENV} must be a JSON object of policy name -> caps, got {raw!r}")
    return limits


# ---- events -----------------------------------------------------------------------------------------------


def events_dir() -> Path:
    """Where event files live: $REFINE_ENGINE_EVENTS_DIR, else a fixed folder under the system temp dir."""
    return Path(os.environ.get(EVENTS_DIR_ENV) or Path(tempfile.gettempdir()) / "refine-engine-events")


def append_event(folder: Path, key: str, event: dict[str, Any]) -> None:
    """Engine side. The key is checked, so a request can never make the plugin write outside the folder."""
    if not is_request_key(key):
        raise ValueError(f"bad request key {key!r}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event, separators=(",", ":")) + "\n")


def read_events(folder: Path, key: str) -> list[dict[str, Any]] | None:
    """Proxy side: every event so far, or None when the engine never reported for this key."""
    try:
        text = (folder / f"{key}.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    # Only complete lines: the engine appends while a stream is still running.
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def discard_events(folder: Path, key: str) -> None:
    (folder / f"{key}.jsonl").unlink(missing_ok=True)
