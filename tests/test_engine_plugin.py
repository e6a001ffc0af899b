"""The engine plugin's bookkeeping, without an engine: rows follow vLLM's BatchUpdate; bad params are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from refine_server.engine_plugin import RefineLogitsProcessor
from refine_server.engine_protocol import EVENTS_DIR_ENV, PARAMS_ARG, POLICY_ARG, REQUEST_KEY_ARG, read_events


def _srgen(key: str, **params) -> SamplingParams:
    import json

    return SamplingParams(temperature=0.6, extra_args={
        POLICY_ARG: "srgen", REQUEST_KEY_ARG: key, PARAMS_ARG: json.dumps(params)})


@pytest.fixture
def processor(tmp_path, monkeypatch) -> RefineLogitsProcessor:
    monkeypatch.setenv(EVENTS_DIR_ENV, str(tmp_path))
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=128, tokenizer="unused"))
    return RefineLogitsProcessor(config, device="cpu", is_pin_memory=False)


def _update(removed=(), added=(), moved=(), size=4) -> BatchUpdate:
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def test_rows_follow_adds_swaps_moves_and_removals(processor: RefineLogitsProcessor) -> None:
    a, b = "a" * 32, "b" * 32
    processor.update_state(_update(added=[(0, _srgen(a), [1, 2], []), (1, SamplingParams(), [1], []),
                                          (2, _srgen(b, lr=0.5), [3], [])]))
    assert {i: s.key for i, s in processor.rows.items()} == {0: a, 2: b}
    assert processor.rows[2].params.lr == 0.5 and processor.rows[0].temperature == 0.6

    processor.update_state(_update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert {i: s.key for i, s in processor.rows.items()} == {1: a, 2: b}

    processor.update_state(_update(removed=[2], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert {i: s.key for i, s in processor.rows.items()} == {0: a}

    # A plain request taking over a row drops the old SRGen state.
    processor.update_state(_update(added=[(0, SamplingParams(), [5], [])]))
    assert processor.rows == {}
    assert read_events(a) == [{"event": "admitted", "sequence": 0}]


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({POLICY_ARG: "nosuch"}, "unknown in-engine policy"),
        ({POLICY_ARG: "srgen", REQUEST_KEY_ARG: "../etc"}, "32 lowercase hex"),
        ({POLICY_ARG: "srgen", REQUEST_KEY_ARG: "c" * 32, PARAMS_ARG: '{"steps": 0}'}, "bad refine_params"),
    ],
)
def test_admission_rejects_bad_requests(extra_args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RefineLogitsProcessor.validate_params(SamplingParams(extra_args=extra_args))
