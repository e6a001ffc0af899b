"""Admission: what the plugin checks when vLLM's API server accepts a request (`validate_params`).

A ValueError here becomes an HTTP 400 with its message, before the request reaches the engine. Requests that
name no refine policy pass untouched. For the others, in order: the handshake is answered (and refused, so
nothing is generated); the policy must be known; the request must be signed by the proxy; its parameters
must be valid and within the caps this engine was given; and the engine must be one the policy (SRGen, or the
token-statistics sensor) can run on.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import metadata
from typing import Any

from pydantic import ValidationError

from refine_server.contract.params import (
    SRGEN,
    ConfidenceStopLimits,
    SRGenEngineSettings,
    SRGenLimits,
    SRGenParams,
    TokenStatsParams,
    enforce_limits,
)
from refine_server.contract.protocol import (
    ALLOW_FAULTS_ENV,
    FAULT_ARG,
    HANDSHAKE_POLICY,
    PARAMS_ARG,
    PLUGIN_MARKER,
    POLICY_ARG,
    PROTOCOL_VERSION,
    REQUEST_KEY_ARG,
    SRGEN_ENGINE_ENV,
    TOKEN_STATS,
    Handshake,
    append_event,
    check_signature,
    engine_policy_limits,
    engine_secret,
    events_dir,
    handshake_reply,
    is_request_key,
)
from refine_server.engine_plugin.tap import read_facts

IN_ENGINE_POLICIES = (SRGEN, TOKEN_STATS)


def plugin_version() -> str:
    try:
        return metadata.version("refine-server")
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def srgen_limits() -> SRGenLimits:
    return SRGenLimits.model_validate(engine_policy_limits().get(SRGEN, {}))


@cache
def confidence_stop_limits() -> ConfidenceStopLimits:
    return ConfidenceStopLimits.model_validate(engine_policy_limits().get(TOKEN_STATS, {}))


@cache
def srgen_engine_settings() -> SRGenEngineSettings:
    return SRGenEngineSettings.model_validate_json(os.environ.get(SRGEN_ENGINE_ENV) or "{}")


def faults_allowed() -> bool:
    return os.environ.get(ALLOW_FAULTS_ENV) == "1"


def unsupported(fact: str = "unsupported") -> list[str]:
    """Why this engine cannot run SRGen correctly (`token_stats_unsupported`: cannot report token statistics),
    as its worker found when the model loaded."""
    facts = read_facts(events_dir())
    return list(facts.get(fact, [])) if facts else []


def validate(sampling_params: Any) -> None:
    args = sampling_params.extra_args or {}
    policy = args.get(POLICY_ARG)
    if policy is None:
        return
    signed = check_signature(args, engine_secret())
    if policy == HANDSHAKE_POLICY:
        _answer_handshake(args, signed)
    if policy not in IN_ENGINE_POLICIES:
        raise ValueError(f"{PLUGIN_MARKER}: unknown in-engine policy {policy!r} (known: {list(IN_ENGINE_POLICIES)})")
    if not is_request_key(args.get(REQUEST_KEY_ARG)):
        raise ValueError(f"{PLUGIN_MARKER}: {REQUEST_KEY_ARG} must be 32 lowercase hex digits")
    if signed != "ok":
        raise ValueError(
            f"{PLUGIN_MARKER}: in-engine policies run only for requests that refine signed "
            f"({signed}); send them through refine"
        )
    if FAULT_ARG in args and not faults_allowed():
        raise ValueError(f"{PLUGIN_MARKER}: {FAULT_ARG} is for test engines only")
    if policy == TOKEN_STATS:
        _validate_token_stats(sampling_params, args)
    else:
        _validate_srgen(args)


def _validate_token_stats(sampling_params: Any, args: dict[str, Any]) -> None:
    try:
        params = TokenStatsParams.model_validate_json(str(args.get(PARAMS_ARG, "{}")))
        if params.stop is not None:
            enforce_limits(params.stop, confidence_stop_limits())
    except ValidationError as exc:
        raise ValueError(f"{PLUGIN_MARKER}: {_field_error(exc)}") from None
    except ValueError as exc:  # LimitExceeded
        raise ValueError(f"{PLUGIN_MARKER}: {PARAMS_ARG}.stop.{exc}") from None
    if params.stop is not None and sampling_params.ignore_eos:
        raise ValueError(
            f"{PLUGIN_MARKER}: {PARAMS_ARG}.stop: the confidence stop ends a sequence with its end-of-sequence "
            "token, which ignore_eos forbids; send the request without ignore_eos or without the stop"
        )
    if reasons := unsupported("token_stats_unsupported"):
        raise ValueError(f"{PLUGIN_MARKER}: this engine cannot report token statistics: {'; '.join(reasons)}")


def _field_error(exc: ValidationError) -> str:
    """The first error, named by its field's path inside the parameters: `refine_params.stop.threshold: ...`."""
    error = exc.errors()[0]
    path = ".".join(str(part) for part in (PARAMS_ARG, *error["loc"]))
    return f"{path}: {error['msg']}"


def _validate_srgen(args: dict[str, Any]) -> None:
    try:
        params = SRGenParams.model_validate_json(str(args.get(PARAMS_ARG, "{}")))
        enforce_limits(params, srgen_limits())
    except ValidationError as exc:
        raise ValueError(f"{PLUGIN_MARKER}: bad {PARAMS_ARG}: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:  # LimitExceeded
        raise ValueError(f"{PLUGIN_MARKER}: {exc}") from None
    if reasons := unsupported():
        raise ValueError(f"{PLUGIN_MARKER}: SRGen cannot run correctly on this engine: {'; '.join(reasons)}")


def _answer_handshake(args: dict[str, Any], signed: str) -> None:
    """Refuse the handshake request with the plugin's report, after leaving one event where the proxy looks."""
    key = args.get(REQUEST_KEY_ARG)
    if signed == "ok" and is_request_key(key):
        append_event(events_dir(), key, {"event": "handshake"})
    # The sensor is offered only where it can report: that one check is how a proxy tells whether to fall back.
    offered = [p for p in IN_ENGINE_POLICIES if p != TOKEN_STATS or not unsupported("token_stats_unsupported")]
    report = Handshake(
        protocol=PROTOCOL_VERSION,
        version=plugin_version(),
        policies=offered,
        signature=signed,
        limits={SRGEN: srgen_limits().model_dump(), TOKEN_STATS: confidence_stop_limits().model_dump()},
        unsupported=unsupported(),
    )
    raise ValueError(handshake_reply(report))
