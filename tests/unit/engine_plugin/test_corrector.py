"""corrector without an engine: a correction is added to the engine's logits; failures, the per-step limit, the
engine's capacity and shared prompts."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm import SamplingParams

from refine_server.engine_plugin.corrector import INJECTED_FAULT, SRGenCorrector, SRGenRow
from refine_server.engine_plugin.sequences import SequenceTable
from refine_server.engine_plugin.tap import ForwardCapture, HiddenStateTap
from tests.unit.engine_plugin.helpers import _srgen

FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}


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
    corrector = SRGenCorrector(
        tap, events, SequenceTable(max_sequences), vocab_size=8, max_len=64, max_rows_per_step=max_rows_per_step
    )
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
    corrector, tap, _ = _corrector()
    request = _srgen(**FORCE)
    seq = corrector.admit(request, prompt_len=3)
    tap.forward = ForwardCapture(
        hidden=torch.randn(3, 4), positions=torch.arange(3), query_start_loc=torch.tensor([0, 3])
    )
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
