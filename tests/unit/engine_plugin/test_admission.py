"""admission without an engine: what the plugin refuses and accepts, the handshake, unsupported engines."""

from __future__ import annotations

import json

import pytest
from vllm import SamplingParams

from refine_server.contract.protocol import (
    FAULT_ARG,
    HANDSHAKE_POLICY,
    PROTOCOL_VERSION,
    parse_handshake_reply,
    read_events,
    signed_xargs,
)
from refine_server.engine_plugin import admission
from refine_server.engine_plugin.corrector import INJECTED_FAULT
from tests.unit.engine_plugin.helpers import SECRET, _srgen, _stats


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({"refine_policy": "nosuch"}, "unknown in-engine policy"),
        ({"refine_policy": "srgen", "refine_request_key": "../etc"}, "32 lowercase hex"),
        (signed_xargs("wrong secret", "srgen", "{}"), r"signed \(mismatch\)"),
        ({"refine_policy": "srgen", "refine_request_key": "c" * 32, "refine_params": "{}"}, "signed"),
        (signed_xargs(SECRET, "srgen", '{"steps": 0}'), "bad refine_params"),
        (signed_xargs(SECRET, "srgen", '{"steps": 9}'), "steps=9 exceeds this server's limit of 4"),
        ({**signed_xargs(SECRET, "srgen", "{}"), FAULT_ARG: INJECTED_FAULT}, "test engines only"),
        (signed_xargs("wrong secret", "token_stats", "{}"), r"signed \(mismatch\)"),
        (signed_xargs(SECRET, "token_stats", '{"window": 3}'), "refine_params.window: Extra inputs"),
        (signed_xargs(SECRET, "token_stats", '{"confidence_k": 21}'), "refine_params.confidence_k: Input should be"),
        (signed_xargs(SECRET, "token_stats", '{"confidence_k": 0}'), "refine_params.confidence_k: Input should be"),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"threshold": NaN}}'), "refine_params.stop.threshold: "),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"threshold": "inf"}}'), "refine_params.stop.threshold: "),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"window": 4}}'), "refine_params.stop.threshold: Field requ"),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"threshold": 1, "window": 0}}'), "refine_params.stop.window"),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"threshold": 1, "stop_after": 0}}'), "stop.stop_after: "),
        (signed_xargs(SECRET, "token_stats", '{"stop": {"threshold": 1, "window": 129}}'), r"stop.window=129 exceeds"),
        (signed_xargs(SECRET, "token_stats", "{not json"), "refine_params: Invalid JSON"),
    ],
)
def test_admission_refuses_what_the_proxy_would_not_send(extra_args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        admission.validate(SamplingParams(extra_args=extra_args))


def test_admission_accepts_a_signed_request_within_the_caps_and_ignores_others() -> None:
    admission.validate(_srgen(steps=4))
    admission.validate(_stats())
    admission.validate(_stats(confidence_k=5, stop={"threshold": 2.0, "window": 128, "stop_after": 3}))
    admission.validate(SamplingParams(extra_args={"other_plugin": 1}))


def test_a_stop_that_could_never_end_by_eos_is_refused_with_the_reason() -> None:
    stopped = _stats(stop={"threshold": 2.0})
    stopped.ignore_eos = True
    with pytest.raises(ValueError, match=r"refine_params\.stop: .*ignore_eos forbids"):
        admission.validate(stopped)
    measured = _stats()
    measured.ignore_eos = True  # without a stop the sensor only measures: nothing to refuse
    admission.validate(measured)


def test_handshake_reports_the_plugin_and_proves_the_events_folder(engine_env) -> None:
    xargs = signed_xargs(SECRET, HANDSHAKE_POLICY, "{}")
    with pytest.raises(ValueError) as err:
        admission.validate(SamplingParams(extra_args=xargs))
    report = parse_handshake_reply(str(err.value)).model_dump()
    assert report["protocol"] == PROTOCOL_VERSION
    assert report["signature"] == "ok" and report["policies"] == ["srgen", "token_stats"]
    assert report["limits"]["srgen"]["steps"] == 4 and report["unsupported"] == []
    assert report["limits"]["token_stats"] == {"window": 128}
    assert read_events(engine_env, xargs["refine_request_key"]) == [{"event": "handshake"}]


def test_unsupported_engines_refuse_srgen_at_admission(engine_env) -> None:
    (engine_env / "engine-facts.json").write_text(json.dumps({"unsupported": ["speculative decoding"]}))
    with pytest.raises(ValueError, match="cannot run correctly on this engine: speculative decoding"):
        admission.validate(_srgen())


def test_an_engine_that_cannot_report_token_stats_refuses_them_and_does_not_offer_them(engine_env) -> None:
    (engine_env / "engine-facts.json").write_text(
        json.dumps({"unsupported": [], "token_stats_unsupported": ["speculative decoding"]})
    )
    with pytest.raises(ValueError, match="cannot report token statistics: speculative decoding"):
        admission.validate(_stats())
    admission.validate(_srgen())  # SRGen's own facts say nothing against it
    with pytest.raises(ValueError) as err:
        admission.validate(SamplingParams(extra_args=signed_xargs(SECRET, HANDSHAKE_POLICY, "{}")))
    assert parse_handshake_reply(str(err.value)).policies == ["srgen"]
