"""entry, v1_processor and v2_processor without an engine: vLLM's own loaders accept what refine registers, and
SRGen's state follows each request (V1 rows, V2 slots)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

from refine_server.engine_plugin.corrector import SRGenRow
from refine_server.engine_plugin.entry import RefineLogitsProcessor
from refine_server.engine_plugin.v1_processor import RefineV1LogitsProcessor
from refine_server.engine_plugin.v2_processor import RefineV2LogitsProcessor
from tests.unit.engine_plugin.helpers import _srgen


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
        device=torch.device("cpu"),
        max_num_reqs=slots,
        vocab_size=8,
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
    ctx = LogitsContext(
        expanded_idx_mapping=None,
        idx_mapping=None,
        idx_mapping_np=np.array([0, 2]),
        expanded_local_pos=None,
        input_ids=None,
        pos=None,
        seq_lens_upper_bound_np=np.array([5, 6]),
    )
    proc.apply(torch.zeros(2, 8), ctx)
    (row,) = seen
    assert (row.row, row.context_len, row.seq.key) == (1, 6, _key(a))
    assert row.token_ids().tolist() == (torch.arange(32, 38) % 8).tolist()  # slot 2's committed tokens
    # The slot is recycled for a plain request: SRGen is off for it.
    assert not proc.add_request(2, SamplingParams())
    assert proc.slots[2] is None
