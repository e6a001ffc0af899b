"""The confidence stop without an engine: on which step it forces end-of-sequence (the window means of the
confidences the sensor recorded, `policies/confidence.group_confidences`), what a forced row looks like, that it
waits while EOS is masked, that a recomputed position changes nothing, and what happens without a free slot.
Both runners' processors drive it; tests/engine/test_confidence_stop.py runs it in the real engine."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from vllm import SamplingParams

from refine_server.contract.protocol import signed_xargs
from refine_server.contract.token_stats_file import STOP_WAIVED, STOPPED, read_stats
from refine_server.engine_plugin.confidence_stop import ConfidenceStop, force_eos_on_device, force_eos_on_host
from refine_server.engine_plugin.sensor import StatsRow, TokenStatsEngineSettings, TokenStatsSensor
from refine_server.engine_plugin.v1_processor import RefineV1LogitsProcessor
from refine_server.engine_plugin.v2_processor import RefineV2LogitsProcessor
from refine_server.policies.confidence import group_confidences
from tests.unit.engine_plugin.helpers import SECRET, _stats
from tests.unit.engine_plugin.test_sensor import VOCAB, _config, _ctx, _draw, _key, _request_state, _update

EOS = 7  # the requests' only stop token: what the stop forces where a request names no eos_token_id
PEAKED, FLAT = 8.0, 0.0  # one token's logit above the rest: C (k = 20) about 7.6 peaked, log 50 = 3.9 flat


def _stop_request(**stop) -> SamplingParams:
    xargs = signed_xargs(SECRET, "token_stats", json.dumps({"stop": stop}))
    return SamplingParams(temperature=0.0, stop_token_ids=[EOS], extra_args=xargs)


def _logits(rows: int, height: float) -> torch.Tensor:
    logits = torch.zeros(rows, VOCAB)
    logits[:, 1] = height
    return logits


def _forced(row: torch.Tensor, before: torch.Tensor, eos: int = EOS) -> bool:
    """The row allows only `eos`, with its logit unchanged."""
    others = torch.cat([row[:eos], row[eos + 1 :]])
    return bool(torch.isneginf(others).all()) and row[eos] == before[eos]


def test_v1_forces_eos_at_the_step_after_the_window_mean_fell_and_leaves_other_rows_alone(engine_env) -> None:
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    stopped, measured_only = _stop_request(threshold=5.0, window=3, stop_after=2), _stats()
    out, other_out = [], []
    proc.update_state(_update(added=[(0, stopped, [1], out), (1, measured_only, [1], other_out)]))
    heights = [PEAKED] * 5 + [FLAT] * 10
    forced_at = None
    for t, height in enumerate(heights):
        if t == 3:  # a partial prompt chunk's draw at this position first (V1 discards it): measured, overwritten
            proc.apply(_logits(2, FLAT))
            _draw(proc, 1, 1)
        before = _logits(2, height)
        after = proc.apply(before.clone())
        assert torch.equal(after[1], before[1])
        if _forced(after[0], before[0]):
            forced_at = t
            _draw(proc, EOS, 1)
            break
        assert torch.equal(after[0], before[0])
        _draw(proc, 1, 1)
        out.append(1)
        other_out.append(1)
    records = read_stats(engine_env, _key(stopped))[0]
    confidences = [records[j].confidence for j in range(len(records))]
    means = group_confidences(confidences, 3)
    expected = next(t for t in range(2, len(heights)) if means[t - 1] < 5.0)
    # Three peaked tokens, then the window's mean falls below 5 once it holds three flat ones.
    assert forced_at == expected == 8
    assert [records[j].stopped for j in range(len(records))] == [0] * 8 + [STOPPED]
    assert records[8].token_id == EOS and records[8].prob == pytest.approx(1 / VOCAB, rel=1e-5)  # the model's own
    assert confidences[3] == pytest.approx(confidences[0])  # the discarded draw's record was overwritten
    assert all(r.stopped == 0 for r in read_stats(engine_env, _key(measured_only))[0].values())


def test_the_stop_waits_while_eos_is_masked(engine_env) -> None:
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    params, out = _stop_request(threshold=1e9, window=2, stop_after=2), []
    proc.update_state(_update(added=[(0, params, [1], out)]))
    for t in range(4):
        before = _logits(1, FLAT)
        if t < 3:  # min_tokens, bad words or a grammar masked EOS before refine's processor ran
            before[0, EOS] = float("-inf")
        after = proc.apply(before.clone())
        assert not torch.isneginf(after[0]).all()
        if t < 3:
            assert torch.equal(after, before)
            _draw(proc, 1)
            out.append(1)
    assert _forced(after[0], before[0])
    _draw(proc, EOS)
    records = read_stats(engine_env, _key(params))[0]
    assert [records[t].stopped for t in range(4)] == [0, 0, 0, STOPPED]


def test_a_sequence_without_a_free_slot_runs_without_the_stop_and_its_records_say_so(engine_env) -> None:
    sensor = TokenStatsSensor(engine_env, vocab_size=VOCAB, capacity=4, stop=ConfidenceStop(capacity=1, window_cap=8))
    first, second = _stop_request(threshold=1e9, stop_after=1), _stop_request(threshold=1e9, stop_after=1)
    rows = [StatsRow(0, sensor.admit(first), 1), StatsRow(1, sensor.admit(second), 1)]
    before = _logits(2, FLAT)
    after = before.clone()
    sensor.stop.apply(after, sensor.observe(after, rows))
    sensor.sampled(torch.tensor([[EOS], [1]]))
    sensor.flush()
    assert _forced(after[0], before[0]) and torch.equal(after[1], before[1])
    assert read_stats(engine_env, _key(first))[0][1].stopped == STOPPED
    assert read_stats(engine_env, _key(second))[0][1].stopped == STOP_WAIVED
    assert len(sensor.stop) == 1
    # vLLM drops the first request: its slot is free for the next sequence (not for one that started without).
    del first, rows
    gc.collect()
    assert len(sensor.stop) == 0
    third = _stop_request(threshold=1e9, stop_after=1)
    after = before[:1].clone()
    sensor.stop.apply(after, sensor.observe(after, [StatsRow(0, sensor.admit(third), 1)]))
    assert _forced(after[0], before[0]) and len(sensor.stop) == 1


def test_v2_slots_stop_like_v1_rows(engine_env) -> None:
    state = _request_state()
    proc = RefineV2LogitsProcessor(_config(), state)
    params = _stop_request(threshold=1e9, window=4, stop_after=2)
    assert proc.add_request(1, params) and not proc.add_request(0, SamplingParams())
    for t in range(3):  # 3 prompt tokens, then t sampled ones visible
        before = _logits(2, PEAKED)
        after = proc.apply(before.clone(), _ctx([0, 1], [5, 3 + t]))
        assert torch.equal(after[0], before[0])
        assert _forced(after[1], before[1]) == (t == 2)
        _draw(proc, 1, EOS if t == 2 else 1)
    records = read_stats(engine_env, _key(params))[0]
    assert [records[t].stopped for t in range(3)] == [0, 0, STOPPED]
    assert all(math.isfinite(records[t].confidence) and records[t].confidence > 0 for t in range(3))


def test_stop_sequences_must_fit_the_rows_the_sensor_measures() -> None:
    with pytest.raises(ValueError, match="max_stop_sequences"):
        TokenStatsEngineSettings(max_rows_per_step=4, max_stop_sequences=5)


def test_forcing_on_the_host_writes_what_forcing_on_the_device_writes() -> None:
    """CPU tensors take the host path (only the rows that stop are written); a GPU the device path (every stop
    row copied and masked, nothing read back). Both must leave the same logits."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    row, eos = torch.tensor([4, 1, 2]), torch.tensor([7, 0, 39])
    fire = torch.tensor([True, False, True])
    eos_logit = logits[row, eos]
    on_host, on_device = logits.clone(), logits.clone()
    force_eos_on_host(on_host, row, eos, eos_logit, fire)
    force_eos_on_device(on_device, row, eos, eos_logit, fire)
    assert torch.equal(on_host, on_device)
    assert _forced(on_host[4], logits[4], 7) and _forced(on_host[2], logits[2], 39)
    assert torch.equal(on_host[[0, 1, 3, 5]], logits[[0, 1, 3, 5]])  # rows that did not fire, or had no stop
