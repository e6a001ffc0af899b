"""The token-statistics sensor without an engine: which rows it measures (V1 rows, V2 slots), what it writes for
each drawn token, and how sequences keep their number through moves, removal and re-adding. The numbers are
checked against a float64 reference; tests/engine/test_sensor.py checks them inside the real engine."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.sampler import Sampler as V1Sampler
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.sampler import Sampler as V2Sampler

from refine_server.contract.token_stats_file import read_stats
from refine_server.engine_plugin.sampler_hook import SAMPLED_TOKENS, wrap_sampler
from refine_server.engine_plugin.sensor import StatsRow, TokenStatsSensor
from refine_server.engine_plugin.v1_processor import RefineV1LogitsProcessor
from refine_server.engine_plugin.v2_processor import RefineV2LogitsProcessor
from tests.unit.engine_plugin.helpers import _srgen, _stats
from tests.unit.kernels.references import reference_token_stats

VOCAB = 50


def _key(params: SamplingParams) -> str:
    return params.extra_args["refine_request_key"]


def _config() -> SimpleNamespace:
    model = SimpleNamespace(max_model_len=128, tokenizer=None, get_vocab_size=lambda: VOCAB)
    return SimpleNamespace(model_config=model)


def _update(removed=(), added=(), moved=()) -> BatchUpdate:
    return BatchUpdate(batch_size=4, removed=list(removed), added=list(added), moved=list(moved))


def _draw(proc, *tokens: int) -> None:
    """What the wrapped sampler does after it drew one token per logits row."""
    SAMPLED_TOKENS.deliver(SimpleNamespace(sampled_token_ids=torch.tensor(tokens)[:, None]))
    proc.sensor.flush()


def _expected(logits_row: torch.Tensor, temperature: float, token: int) -> list[float]:
    stats = reference_token_stats(logits_row[None], torch.tensor([temperature]))
    prob = torch.softmax(logits_row.double() / temperature, dim=-1)[token]
    return [float(s[0]) for s in stats] + [float(prob)]


def _assert_record(folder, params, sequence: int, index: int, token: int, logits_row, temperature) -> None:
    record = read_stats(folder, _key(params))[sequence][index]
    assert record.token_id == token
    got = [record.entropy, record.varentropy, record.margin, record.prob]
    np.testing.assert_allclose(got, _expected(logits_row, temperature, token), rtol=1e-5, atol=1e-6)


def test_the_processors_wrap_their_runners_sampler_once() -> None:
    RefineV1LogitsProcessor(_config(), "cpu", False)
    RefineV2LogitsProcessor(_config(), _request_state())
    assert V1Sampler.forward._refine_sampled_tokens and V2Sampler.__call__._refine_sampled_tokens
    wrapped = V1Sampler.forward
    wrap_sampler(V1Sampler, "forward")
    assert V1Sampler.forward is wrapped


def test_wrapped_sampler_hands_its_draw_to_the_listener_and_returns_it_unchanged() -> None:
    class FakeSampler:
        def __call__(self, logits):
            return SimpleNamespace(sampled_token_ids=logits.argmax(dim=-1, keepdim=True))

    wrap_sampler(FakeSampler, "__call__")
    seen = []
    previous, SAMPLED_TOKENS.listener = SAMPLED_TOKENS.listener, seen.append
    try:
        out = FakeSampler()(torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    finally:
        SAMPLED_TOKENS.listener = previous
    assert out.sampled_token_ids.tolist() == [[1], [0]] and seen == [out.sampled_token_ids]


def test_v1_measures_the_rows_that_asked_and_follows_moves_and_removals(engine_env) -> None:
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    a, b = _stats(), _stats(temperature=0.7)
    out_a, out_b = [], [5]  # vLLM's live output lists: b has one token already
    proc.update_state(
        _update(
            added=[(0, a, [1, 2], out_a), (1, SamplingParams(), [1], []), (2, _srgen(), [3], []), (3, b, [3], out_b)]
        )
    )
    assert set(proc.stats_rows) == {0, 3}  # not the plain request, not SRGen's
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    proc.apply(logits.clone())
    _draw(proc, 4, 9, 8, 11)
    _assert_record(engine_env, a, 0, 0, 4, logits[0], 1.0)  # greedy: measured at T = 1
    _assert_record(engine_env, b, 0, 1, 11, logits[3], 0.7)
    assert read_stats(engine_env, _key(a)).keys() == {0} and len(read_stats(engine_env, _key(a))[0]) == 1

    # b moves to row 0 (a swap), the plain request leaves, both sampled tokens join their lists.
    proc.update_state(_update(removed=[1], moved=[(3, 0, MoveDirectionality.SWAP)]))
    out_a.append(4)
    out_b.append(11)
    assert {i: r.seq.key for i, r in proc.stats_rows.items()} == {0: _key(b), 3: _key(a)}
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    proc.apply(logits.clone())
    _draw(proc, 7, 0, 0, 3)
    _assert_record(engine_env, b, 0, 2, 7, logits[0], 0.7)
    _assert_record(engine_env, a, 0, 1, 3, logits[3], 1.0)

    proc.update_state(_update(removed=[0]))
    assert set(proc.stats_rows) == {3}


def test_n_choices_are_numbered_sequences_and_a_readded_choice_keeps_its_number(engine_env) -> None:
    parent = _stats(temperature=0.8)
    children = [parent.clone(), parent.clone()]  # vLLM gives each choice its own copy of the params
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    proc.update_state(_update(added=[(0, children[0], [1], []), (1, children[1], [1], [])]))
    assert [proc.stats_rows[i].seq.ordinal for i in (0, 1)] == [0, 1]
    proc.update_state(_update(removed=[1]))  # preempted, or skipped for a step
    proc.update_state(_update(added=[(2, children[1], [1], [6, 6])]))  # back, on another row
    assert proc.stats_rows[2].seq.ordinal == 1
    proc.apply(torch.zeros(3, VOCAB))
    _draw(proc, 1, 0, 2)
    assert {s: sorted(r) for s, r in read_stats(engine_env, _key(parent)).items()} == {0: [0], 1: [2]}
    # vLLM dropping a request drops its sequence.
    proc.update_state(_update(removed=[0, 2]))
    del children
    gc.collect()
    assert len(proc.sensor) == 0


def _request_state(slots: int = 4) -> LogitsProcRequestState:
    return LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=slots,
        vocab_size=VOCAB,
        all_token_ids=SimpleNamespace(gpu=torch.zeros(slots, 16, dtype=torch.int32)),
        prompt_len=SimpleNamespace(np=np.full(slots, 3, dtype=np.int32)),
        prefill_len=SimpleNamespace(np=np.full(slots, 3, dtype=np.int32)),
        total_len=SimpleNamespace(),
    )


def _ctx(slots: list[int], seq_lens: list[int]) -> LogitsContext:
    return LogitsContext(
        expanded_idx_mapping=None,
        idx_mapping=None,
        idx_mapping_np=np.array(slots),
        expanded_local_pos=None,
        input_ids=None,
        pos=None,
        seq_lens_upper_bound_np=np.array(seq_lens),
    )


def test_v2_slots_measure_the_rows_that_asked_and_skip_partial_prompt_chunks(engine_env) -> None:
    state = _request_state()
    proc = RefineV2LogitsProcessor(_config(), state)
    a, b = _stats(temperature=1.3), _stats()
    # True for the sensor too, although it changes no logits: V2 runs `apply` only for batches with such a row.
    assert proc.add_request(2, a) and proc.add_request(1, b) and not proc.add_request(0, SamplingParams())
    state.prefill_len.np[1] = 10  # b's prompt (or a preempted b's prompt and outputs) arrives in chunks
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    proc.apply(logits.clone(), _ctx([0, 2, 1], [5, 6, 7]))
    _draw(proc, 1, 2, 3)
    _assert_record(engine_env, a, 0, 3, 2, logits[1], 1.3)  # 6 tokens visible, 3 of them the prompt
    assert read_stats(engine_env, _key(b)) is None  # a partial chunk: vLLM throws its draw away

    # a is preempted and re-added to another slot; its old slot goes to a plain request.
    assert not proc.add_request(2, SamplingParams()) and proc.stats_slots[2] is None
    assert proc.add_request(3, a) and proc.stats_slots[3].ordinal == 0
    proc.apply(logits.clone(), _ctx([3], [7]))
    _draw(proc, 5)
    assert sorted(read_stats(engine_env, _key(a))[0]) == [3, 4]


def test_rows_over_the_capacity_go_unmeasured_and_a_mismatched_draw_is_dropped(engine_env) -> None:
    sensor = TokenStatsSensor(engine_env, vocab_size=VOCAB, capacity=1)
    a, b = _stats(), _stats()
    rows = [StatsRow(0, sensor.admit(a), 0), StatsRow(1, sensor.admit(b), 0)]
    sensor.observe(torch.randn(2, VOCAB), rows)
    sensor.sampled(torch.tensor([[1], [2]]))
    sensor.flush()
    assert read_stats(engine_env, _key(a)) is not None and read_stats(engine_env, _key(b)) is None

    sensor.observe(torch.randn(2, VOCAB), [StatsRow(1, rows[1].seq, 0)])
    sensor.sampled(torch.tensor([[1]]))  # one row drawn, the measured row was row 1: not this step's draw
    sensor.flush()
    assert read_stats(engine_env, _key(b)) is None
