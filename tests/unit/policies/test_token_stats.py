"""policies.token_stats and `none`'s summary without an engine: choices get the engine sequence that drew their
tokens, what never arrived is reported missing, and a backend without the sensor is said to be one. The
engine's side is faked by writing its file; tests/engine/test_sensor.py runs the real one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from refine_server.contract.params import ConfidenceStopParams, TokenStatsParams
from refine_server.contract.protocol import (
    PARAMS_ARG,
    PROTOCOL_VERSION,
    REQUEST_KEY_ARG,
    EngineLink,
    Handshake,
    PluginInfo,
)
from refine_server.contract.token_stats_file import RECORD, STOP_WAIVED, STOPPED, StatsRecord, stats_path
from refine_server.policies.base import PolicyRequestError
from refine_server.policies.none import NoneParams, NonePolicy
from refine_server.policies.token_stats import TokenStatsUnavailable, match_choices, read_choices
from tests.conftest import policy_call


def _records(sequence: int, tokens: list[int], entropy: float = 1.0) -> dict[int, StatsRecord]:
    return {j: StatsRecord(sequence, j, t, entropy + j, 0.5, 0.25, 0.125, 2.0 + j, 0) for j, t in enumerate(tokens)}


def test_each_choice_gets_the_sequence_that_drew_its_tokens_whatever_the_engines_numbering() -> None:
    # The engine numbered the choices' sequences the other way round, and drew one token past choice 1's stop
    # string before vLLM stopped it.
    sequences = {0: _records(0, [5, 6, 7, 8], entropy=10.0), 1: _records(1, [5, 9, 2])}
    matched = match_choices({0: [5, 9], 1: [5, 6, 7, 8]}, sequences, final=False)
    assert matched[0].entropy == [1.0, 2.0] and matched[0].token_ids == [5, 9] and matched[0].missing == 0
    assert matched[1].entropy == [10.0, 11.0, 12.0, 13.0]
    assert matched[1].summary() == {"tokens": 4, "mean_entropy": 11.5, "max_entropy": 13.0}


def test_tokens_not_recorded_yet_are_waited_for_then_reported_missing() -> None:
    sequences = {0: _records(0, [5, 6])}
    assert match_choices({0: [5, 6, 7]}, sequences, final=False) is None
    (stats,) = match_choices({0: [5, 6, 7]}, sequences, final=True).values()
    assert stats.missing == 1 and math.isnan(stats.prob[2]) and stats.prob[:2] == [0.125, 0.125]
    assert stats.summary() == {"tokens": 3, "mean_entropy": 1.5, "max_entropy": 2.0, "missing": 1}


async def test_read_choices_reads_whole_records_and_later_records_win(tmp_path: Path) -> None:
    key = "e" * 32
    discarded_draw = RECORD.pack(0, 0, 99, 9.0, 9.0, 9.0, 9.0, 9.0, 1)  # a partial prompt chunk's, overwritten
    data = discarded_draw + b"".join(
        RECORD.pack(0, j, t, 1.0, 0.5, 0.25, 0.125, 3.0 + j, 0) for j, t in enumerate([5, 6])
    )
    stats_path(tmp_path, key).write_bytes(data + RECORD.pack(0, 2, 7, 1, 1, 1, 1, 1, 0)[:10])  # being written
    stats = await read_choices(tmp_path, key, {0: [5, 6]}, wait_s=0)
    assert stats[0].entropy == [1.0, 1.0] and stats[0].missing == 0
    assert stats[0].confidence == [3.0, 4.0] and stats[0].stopped_at is None and not stats[0].stop_waived


def test_the_forced_token_is_where_the_choice_stopped_and_a_waived_stop_is_said() -> None:
    records = _records(0, [5, 6, 2])
    records[2] = dataclasses.replace(records[2], stopped=STOPPED)
    (stats,) = match_choices({0: [5, 6, 2]}, {0: records}, final=True).values()
    assert stats.stopped_at == 2 and not stats.stop_waived and stats.confidence == [2.0, 3.0, 4.0]
    waived = {j: dataclasses.replace(r, stopped=STOP_WAIVED) for j, r in _records(0, [5, 6]).items()}
    (stats,) = match_choices({0: [5, 6]}, {0: waived}, final=True).values()
    assert stats.stopped_at is None and stats.stop_waived


class PluginBackend:
    """Answers like vLLM with refine's plugin: writes the sensor's records for the tokens it returns."""

    def __init__(self, events_dir: Path, policies: list[str], limits: dict[str, dict[str, Any]] | None = None):
        self.link = EngineLink(secret="s", events_dir=events_dir)
        self.policies = policies
        self.limits = limits or {}
        self.bodies: list[dict[str, Any]] = []

    async def plugin(self, model: str) -> PluginInfo:
        handshake = Handshake(
            protocol=PROTOCOL_VERSION,
            version="1",
            policies=self.policies,
            signature="ok",
            limits=self.limits,
            unsupported=[],
        )
        return PluginInfo(handshake, events_shared=True)

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        self.bodies.append(body)
        xargs = body.get("vllm_xargs") or {}
        if REQUEST_KEY_ARG in xargs:
            records = [RECORD.pack(0, j, t, float(j), 0.0, 0.0, 1.0, 1.5, 0) for j, t in enumerate([3, 4, 5])]
            stats_path(self.link.events_dir, xargs[REQUEST_KEY_ARG]).write_bytes(b"".join(records))
        choice = {"index": 0, "text": "abc", "finish_reason": "length"}
        if body.get("return_token_ids"):
            choice["token_ids"] = [3, 4, 5]
        return {"choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}


@pytest.mark.parametrize("policies", [["srgen", "token_stats"], ["srgen"]])
async def test_none_summarises_token_stats_or_says_why_it_cannot(tmp_path: Path, policies: list[str]) -> None:
    backend = PluginBackend(tmp_path, policies)
    call = policy_call("completions", {"model": "m", "prompt": "q"}, backend)
    result = await NonePolicy().complete(call, NoneParams(token_stats=True))
    assert result["choices"][0]["text"] == "abc" and "token_ids" not in result["choices"][0]
    if "token_stats" in policies:
        assert call.trace.data == {
            "token_stats": "reported",
            "choices": [{"index": 0, "tokens": 3, "mean_entropy": 1.0, "max_entropy": 2.0}],
        }
        assert not list(tmp_path.iterdir())  # the file is gone once read
    else:
        assert call.trace.data["token_stats"].startswith("unavailable: ")
        assert "vllm_xargs" not in backend.bodies[-1]  # answered as without the option
        with pytest.raises(TokenStatsUnavailable, match="does not report token statistics"):
            await call.engine.chat_with_token_stats("x", [{"role": "user", "content": "q"}])


async def test_none_without_the_option_relays_the_body_untouched(tmp_path: Path) -> None:
    backend = PluginBackend(tmp_path, ["srgen", "token_stats"])
    call = policy_call("completions", {"model": "m", "prompt": "q"}, backend)
    await NonePolicy().complete(call, NoneParams())
    assert backend.bodies == [{"model": "m", "prompt": "q"}] and call.trace.data == {}


async def test_the_sensors_parameters_are_signed_defaults_when_none_are_given(tmp_path: Path) -> None:
    backend = PluginBackend(tmp_path, ["token_stats"])
    call = policy_call("completions", {"model": "m", "prompt": "q"}, backend)
    _, stats = await call.engine.completions_with_token_stats("x", "q")
    assert json.loads(backend.bodies[-1]["vllm_xargs"][PARAMS_ARG]) == {"confidence_k": 20}
    assert stats[0].confidence == [1.5, 1.5, 1.5]
    stop = ConfidenceStopParams(threshold=2.5, window=8, stop_after=4)
    await call.engine.completions_with_token_stats("x", "q", sensor=TokenStatsParams(confidence_k=5, stop=stop))
    sent = TokenStatsParams.model_validate_json(backend.bodies[-1]["vllm_xargs"][PARAMS_ARG])
    assert sent == TokenStatsParams(confidence_k=5, stop=stop)


async def test_a_stop_window_over_the_engines_cap_is_a_400_before_any_engine_call(tmp_path: Path) -> None:
    backend = PluginBackend(tmp_path, ["token_stats"], limits={"token_stats": {"window": 16}})
    call = policy_call("completions", {"model": "m", "prompt": "q"}, backend)
    sensor = TokenStatsParams(stop=ConfidenceStopParams(threshold=1.0, window=17))
    with pytest.raises(PolicyRequestError, match="window=17 exceeds") as caught:
        await call.engine.chat_with_token_stats("x", [{"role": "user", "content": "q"}], sensor=sensor)
    assert caught.value.param == "refine.window" and backend.bodies == []
    # An unvalidated model (built without validation) is validated again before it is signed.
    bad = TokenStatsParams.model_construct(confidence_k=21, stop=None)
    with pytest.raises(ValueError, match="confidence_k"):
        await call.engine.chat_with_token_stats("x", [{"role": "user", "content": "q"}], sensor=bad)
