"""policies.token_stats and `none`'s summary without an engine: choices get the engine sequence that drew their
tokens, what never arrived is reported missing, and a backend without the sensor is said to be one. The
engine's side is faked by writing its file; tests/engine/test_sensor.py runs the real one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from refine_server.contract.protocol import PROTOCOL_VERSION, REQUEST_KEY_ARG, EngineLink, Handshake, PluginInfo
from refine_server.contract.token_stats_file import RECORD, StatsRecord, stats_path
from refine_server.policies.none import NoneParams, NonePolicy
from refine_server.policies.token_stats import TokenStatsUnavailable, match_choices, read_choices
from tests.conftest import policy_call


def _records(sequence: int, tokens: list[int], entropy: float = 1.0) -> dict[int, StatsRecord]:
    return {j: StatsRecord(sequence, j, t, entropy + j, 0.5, 0.25, 0.125) for j, t in enumerate(tokens)}


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
    discarded_draw = RECORD.pack(0, 0, 99, 9.0, 9.0, 9.0, 9.0)  # a partial prompt chunk's, overwritten below
    data = discarded_draw + b"".join(RECORD.pack(0, j, t, 1.0, 0.5, 0.25, 0.125) for j, t in enumerate([5, 6]))
    stats_path(tmp_path, key).write_bytes(data + RECORD.pack(0, 2, 7, 1, 1, 1, 1)[:10])  # a record being written
    stats = await read_choices(tmp_path, key, {0: [5, 6]}, wait_s=0)
    assert stats[0].entropy == [1.0, 1.0] and stats[0].missing == 0


class PluginBackend:
    """Answers like vLLM with refine's plugin: writes the sensor's records for the tokens it returns."""

    def __init__(self, events_dir: Path, policies: list[str]):
        self.link = EngineLink(secret="s", events_dir=events_dir)
        self.policies = policies
        self.bodies: list[dict[str, Any]] = []

    async def plugin(self, model: str) -> PluginInfo:
        handshake = Handshake(
            protocol=PROTOCOL_VERSION, version="1", policies=self.policies, signature="ok", limits={}, unsupported=[]
        )
        return PluginInfo(handshake, events_shared=True)

    async def post_json(self, path: str, body: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        self.bodies.append(body)
        xargs = body.get("vllm_xargs") or {}
        if REQUEST_KEY_ARG in xargs:
            records = [RECORD.pack(0, j, t, float(j), 0.0, 0.0, 1.0) for j, t in enumerate([3, 4, 5])]
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
