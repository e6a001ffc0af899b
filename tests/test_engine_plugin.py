"""The engine plugin without an engine: vLLM's own loaders, admission, state by request, and the corrector."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

from refine_server.engine_plugin import admission
from refine_server.engine_plugin.corrector import INJECTED_FAULT, SRGenCorrector, SRGenRow
from refine_server.engine_plugin.entry import RefineLogitsProcessor
from refine_server.engine_plugin.events import EventWriter
from refine_server.engine_plugin.protocol import (
    EVENTS_DIR_ENV,
    FAULT_ARG,
    HANDSHAKE_POLICY,
    LIMITS_ENV,
    PLUGIN_MARKER,
    SECRET_ENV,
    read_events,
    signed_xargs,
)
from refine_server.engine_plugin.sequences import SequenceTable
from refine_server.engine_plugin.srgen import EntropyMonitor
from refine_server.engine_plugin.srgen_params import SRGenParams
from refine_server.engine_plugin.tap import ForwardCapture, HiddenStateTap
from refine_server.engine_plugin.v1_processor import RefineV1LogitsProcessor
from refine_server.engine_plugin.v2_processor import RefineV2LogitsProcessor

SECRET = "s" * 64
FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}


@pytest.fixture(autouse=True)
def engine_env(tmp_path, monkeypatch):
    monkeypatch.setenv(EVENTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(LIMITS_ENV, json.dumps({"srgen": {"steps": 4}}))
    admission.srgen_limits.cache_clear()
    yield tmp_path
    admission.srgen_limits.cache_clear()


def _srgen(temperature: float = 0.6, secret: str = SECRET, **params) -> SamplingParams:
    return SamplingParams(temperature=temperature, extra_args=signed_xargs(secret, "srgen", json.dumps(params)))


def _key(params: SamplingParams) -> str:
    return params.extra_args["refine_request_key"]


def _config(vocab: int = 8) -> SimpleNamespace:
    model = SimpleNamespace(max_model_len=128, tokenizer=None, get_vocab_size=lambda: vocab)
    return SimpleNamespace(model_config=model)


# ---- vLLM's own loaders --------------------------------------------------------------------------------

def test_both_of_vllms_loaders_accept_what_refine_registers() -> None:
    """Model Runner V2 (the CUDA default) refuses any V1-only class in the entry-point group, so vLLM would
    not start; V1 constructs every class with V1's arguments. Both must accept refine's entry point."""
    from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_plugins,
        build_custom_logits_processors_params_validator,
    )

    assert RefineLogitsProcessor in _load_v2_logitsprocs_plugins()
    assert RefineLogitsProcessor in _load_logitsprocs_plugins()
    v2 = RefineLogitsProcessor(_config(), _request_state())
    v1 = RefineLogitsProcessor(_config(), "cpu", False)
    assert isinstance(v2, RefineV2LogitsProcessor) and isinstance(v1, RefineV1LogitsProcessor)
    # The admission check V2's API server builds at start-up runs refine's validation.
    validator = build_custom_logits_processors_params_validator(None)
    with pytest.raises(VLLMValidationError, match="signed"):
        validator(_srgen(secret="not the engine's"))


# ---- admission -------------------------------------------------------------------------------------------

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
    ],
)
def test_admission_refuses_what_the_proxy_would_not_send(extra_args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        admission.validate(SamplingParams(extra_args=extra_args))


def test_admission_accepts_a_signed_request_within_the_caps_and_ignores_others() -> None:
    admission.validate(_srgen(steps=4))
    admission.validate(SamplingParams(extra_args={"other_plugin": 1}))


def test_handshake_reports_the_plugin_and_proves_the_events_folder(engine_env) -> None:
    xargs = signed_xargs(SECRET, HANDSHAKE_POLICY, "{}")
    with pytest.raises(ValueError) as err:
        admission.validate(SamplingParams(extra_args=xargs))
    report = json.loads(str(err.value).split(PLUGIN_MARKER, 1)[1])
    assert report["signature"] == "ok" and report["policies"] == ["srgen"]
    assert report["limits"]["srgen"]["steps"] == 4 and report["unsupported"] == []
    assert read_events(engine_env, xargs["refine_request_key"]) == [{"event": "handshake"}]


def test_unsupported_engines_refuse_srgen_at_admission(engine_env) -> None:
    (engine_env / "engine-facts.json").write_text(json.dumps({"unsupported": ["speculative decoding"]}))
    with pytest.raises(ValueError, match="cannot run correctly on this engine: speculative decoding"):
        admission.validate(_srgen())


# ---- state by request (V1 rows, V2 slots) --------------------------------------------------------------

def _update(removed=(), added=(), moved=()) -> BatchUpdate:
    return BatchUpdate(batch_size=4, removed=list(removed), added=list(added), moved=list(moved))


def test_v1_rows_follow_moves_and_a_request_that_leaves_and_returns_keeps_its_state() -> None:
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    a, b = _srgen(), _srgen(lr=0.5)
    proc.update_state(_update(added=[(0, a, [1, 2], []), (1, SamplingParams(), [1], []), (2, b, [3], [])]))
    assert {i: r.seq.key for i, r in proc.rows.items()} == {0: _key(a), 2: _key(b)}
    proc.rows[0].seq.monitor.corrections = 2

    proc.update_state(_update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert {i: r.seq.key for i, r in proc.rows.items()} == {1: _key(a), 2: _key(b)}
    proc.update_state(_update(removed=[1]))  # not scheduled this step (token budget), or preempted
    proc.update_state(_update(added=[(3, a, [1, 2], [7, 8])]))  # back, on another row
    assert proc.rows[3].seq.monitor.corrections == 2 and proc.rows[3].context_len() == 4
    # A plain request taking over a row drops the row, not the other sequences.
    proc.update_state(_update(added=[(2, SamplingParams(), [5], [])]))
    assert set(proc.rows) == {3}


def test_n_choices_are_separate_sequences_of_one_request() -> None:
    parent = _srgen()
    children = [parent.clone(), parent.clone()]  # vLLM gives each choice its own copy of the params
    proc = RefineV1LogitsProcessor(_config(), "cpu", False)
    proc.update_state(_update(added=[(0, children[0], [1], []), (1, children[1], [1], [])]))
    assert [proc.rows[i].seq.ordinal for i in (0, 1)] == [0, 1]
    assert proc.rows[0].seq is not proc.rows[1].seq


def _request_state(slots: int = 4) -> LogitsProcRequestState:
    all_ids = torch.arange(slots * 16, dtype=torch.int32).reshape(slots, 16) % 8
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=8,
        all_token_ids=SimpleNamespace(gpu=all_ids),
        prompt_len=SimpleNamespace(np=np.full(slots, 3, dtype=np.int32)),
        prefill_len=SimpleNamespace(np=np.full(slots, 3, dtype=np.int32)),
        total_len=SimpleNamespace(),
    )


def test_v2_slots_are_reset_on_add_and_rows_map_through_the_context() -> None:
    proc = RefineV2LogitsProcessor(_config(), _request_state())
    a = _srgen()
    assert proc.add_request(2, a) and not proc.add_request(0, SamplingParams())
    seen: list[SRGenRow] = []
    proc.corrector.step = lambda logits, rows: seen.extend(rows)
    ctx = LogitsContext(expanded_idx_mapping=None, idx_mapping=None, idx_mapping_np=np.array([0, 2]),
                        expanded_local_pos=None, input_ids=None, pos=None,
                        seq_lens_upper_bound_np=np.array([5, 6]))
    proc.apply(torch.zeros(2, 8), ctx)
    (row,) = seen
    assert (row.row, row.context_len, row.seq.key) == (1, 6, _key(a))
    assert row.token_ids().tolist() == (torch.arange(32, 38) % 8).tolist()  # slot 2's committed tokens
    # The slot is recycled for a plain request: SRGen is off for it.
    assert not proc.add_request(2, SamplingParams())
    assert proc.slots[2] is None


# ---- the corrector ---------------------------------------------------------------------------------------

class _Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, dict]] = []

    def emit(self, key: str, event: dict) -> None:
        self.log.append((key, event))

    def flush(self) -> None:
        pass


def _corrector(max_rows_per_step: int = 4, max_sequences: int = 8) -> tuple[SRGenCorrector, HiddenStateTap, _Events]:
    torch.manual_seed(0)
    tap = HiddenStateTap()
    tap.model = SimpleNamespace(lm_head=SimpleNamespace(weight=torch.randn(8, 4)))
    events = _Events()
    corrector = SRGenCorrector(tap, events, SequenceTable(max_sequences), vocab_size=8, max_len=64,
                               max_rows_per_step=max_rows_per_step)
    return corrector, tap, events


_LIVE_REQUESTS: list[SamplingParams] = []


def _decoding_rows(corrector: SRGenCorrector, count: int, **params):
    """`count` sequences with a 3-token prompt and 2 tokens written, hidden states stored up to position 3."""
    rows = []
    for i in range(count):
        sp = _srgen(lr=0.5, steps=2, **FORCE, **params)
        _LIVE_REQUESTS.append(sp)  # as vLLM holds a running request's params
        seq = corrector.admit(sp, prompt_len=3)
        seq.store(torch.randn(4, 4), 0, 64)
        rows.append(SRGenRow(i, seq, 5, lambda: torch.tensor([1, 2, 3, 4, 5])))
    return rows


def test_a_correction_is_added_to_the_engines_logits_so_masks_hold() -> None:
    corrector, tap, events = _corrector()
    (row,) = _decoding_rows(corrector, 1)
    tap.sampled = torch.randn(1, 4)
    logits = tap.sampled @ tap.model.lm_head.weight.T
    logits[0, 5] = float("-inf")  # a token the engine masked (bad words, grammar, logit_bias -inf)
    before = logits.clone()
    corrector.step(logits, [row])
    kinds = [e["event"] for _, e in events.log]
    assert kinds == ["admitted", "correction"]
    assert not torch.equal(logits, before) and torch.isinf(logits[0, 5])
    correction = events.log[-1][1]
    assert correction["output_index"] == 2 and correction["token_after"]["id"] == int(logits[0].argmax())


def test_a_failing_correction_leaves_the_logits_and_says_why() -> None:
    corrector, tap, events = _corrector()
    (row,) = _decoding_rows(corrector, 1)
    row.seq.fault = INJECTED_FAULT
    tap.sampled = torch.randn(1, 4)
    logits = torch.randn(1, 8)
    before = logits.clone()
    corrector.step(logits, [row])
    assert torch.equal(logits, before)
    assert events.log[-1][1]["event"] == "failed" and "injected fault" in events.log[-1][1]["reason"]
    assert row.seq.done and row.seq.hidden is None


def test_rows_over_the_per_step_limit_go_uncorrected_with_their_budget_kept() -> None:
    corrector, tap, events = _corrector(max_rows_per_step=1)
    rows = _decoding_rows(corrector, 3, max_corrections=5)
    tap.sampled = torch.randn(3, 4)
    corrector.step(torch.randn(3, 8), rows)
    kinds = [e["event"] for _, e in events.log if e["event"] != "admitted"]
    assert kinds.count("correction") == 1 and kinds.count("skipped") == 2
    assert sorted(r.seq.monitor.corrections for r in rows) == [0, 0, 1]


def test_placeholder_token_ids_are_never_used_as_targets() -> None:
    corrector, tap, events = _corrector()
    (row,) = _decoding_rows(corrector, 1)
    row.token_ids = lambda: torch.tensor([1, 2, 3, 4, -1])  # V1 async scheduling's not-yet-known token
    tap.sampled = torch.randn(1, 4)
    logits = torch.randn(1, 8)
    before = logits.clone()
    corrector.step(logits, [row])
    assert torch.equal(logits, before) and "placeholders" in events.log[-1][1]["reason"]


def test_the_first_token_after_the_prompt_is_not_monitored() -> None:
    corrector, tap, events = _corrector()
    request = _srgen(**FORCE)
    seq = corrector.admit(request, prompt_len=3)
    tap.forward = ForwardCapture(hidden=torch.randn(3, 4), positions=torch.arange(3),
                                 query_start_loc=torch.tensor([0, 3]))
    corrector.step(torch.randn(1, 8), [SRGenRow(0, seq, 3, lambda: torch.tensor([1, 2, 3]))])
    assert seq.filled == 3 and seq.monitor.history == []


def test_sequences_over_the_engines_capacity_run_without_srgen_and_say_so() -> None:
    corrector, _, events = _corrector(max_sequences=1)
    requests = [_srgen(), _srgen()]  # the table forgets a sequence when vLLM drops its params
    first = corrector.admit(requests[0], prompt_len=3)
    second = corrector.admit(requests[1], prompt_len=3)
    assert not first.done and second.done
    assert "limit" in events.log[-1][1]["reason"]


def test_later_choices_take_the_shared_prompt_hidden_states_from_an_earlier_one() -> None:
    """n>1 choices share a cache salt, so vLLM computes the prompt once: the later choice copies it."""
    corrector, _, _ = _corrector()
    choices = [_srgen().clone()] * 2
    choices[1] = choices[0].clone()
    first = corrector.admit(choices[0], prompt_len=6)
    second = corrector.admit(choices[1], prompt_len=6)
    prompt = torch.randn(6, 4)
    assert first.store(prompt, 0, 64)
    assert second.store(prompt[4:], 4, 64)  # vLLM recomputed only the last block for the second choice
    assert torch.equal(second.hidden[:6], prompt) and second.ordinal == 1


# ---- monitor ---------------------------------------------------------------------------------------------

def test_monitor_uses_the_fixed_threshold_until_the_window_fills() -> None:
    monitor = EntropyMonitor(SRGenParams(window=3, warmup_threshold=2.0, max_corrections=5))
    assert monitor.observe(2.5) == (True, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)


def test_monitor_dynamic_threshold_uses_the_sample_standard_deviation() -> None:
    params = SRGenParams(window=4, k=2.0, min_std=0.5, min_threshold=1.8, max_corrections=1)
    monitor = EntropyMonitor(params, history=[1.0, 1.0, 1.0, 1.0])
    fired, tau = monitor.observe(2.5)
    assert tau == pytest.approx(1.0 + 2.0 * 0.5)  # std 0 -> min_std
    assert fired
    # The window now holds [1, 1, 1, 2.5]: mean 1.375, sample std (N-1, as torch.std) 0.75; budget spent.
    fired, tau = monitor.observe(9.0)
    assert tau == pytest.approx(1.375 + 2 * 0.75)
    assert not fired


def test_monitor_floor() -> None:
    monitor = EntropyMonitor(SRGenParams(window=2, k=0.0, min_std=0.0, min_threshold=1.8), history=[0.1, 0.1])
    assert monitor.observe(1.0) == (False, 1.8)


def test_event_writer_writes_off_the_caller_and_flush_waits(engine_env) -> None:
    writer = EventWriter(engine_env, tokenizer_name=None)
    writer.emit("a" * 32, {"event": "correction", "token_before": {"id": 1}})
    writer.flush()
    assert read_events(engine_env, "a" * 32) == [{"event": "correction", "token_before": {"id": 1, "text": None}}]


def test_forward_capture_maps_batch_rows_to_their_tokens_and_first_positions() -> None:
    """Read to the host once per step: a decode row (one token at position 9) then a prefill chunk (4 tokens)."""
    capture = ForwardCapture(hidden=torch.randn(5, 4), positions=torch.tensor([9, 0, 1, 2, 3]),
                             query_start_loc=torch.tensor([0, 1, 5]))
    assert capture.host_rows == [(0, 1, 9), (1, 5, 0)]
