"""SRGen inside the real engine, checked against an independent plain-PyTorch recomputation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from openai import OpenAI

from refine_server.engine_protocol import EVENTS_DIR_ENV, append_event
from refine_server.policies.base import PolicyCall
from refine_server.policies.srgen import EntropyMonitor, SRGenParams, _fill_trace
from tests.conftest import MODEL

# Thresholds of zero make the first `max_corrections` tokens trigger: a correction is guaranteed.
FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}
NEVER = {"warmup_threshold": 1e9, "min_threshold": 1e9}
PROMPT = "The three primary colours are"


# ---- monitor (no engine) -----------------------------------------------------------------------------

def test_monitor_uses_the_fixed_threshold_until_the_window_fills() -> None:
    monitor = EntropyMonitor(SRGenParams(window=3, warmup_threshold=2.0, max_corrections=5))
    assert monitor.observe(2.5) == (True, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)
    assert monitor.observe(1.0) == (False, 2.0)


def test_monitor_dynamic_threshold_and_budget() -> None:
    params = SRGenParams(window=4, k=2.0, min_std=0.5, min_threshold=1.8, max_corrections=1)
    monitor = EntropyMonitor(params, history=[1.0, 1.0, 1.0, 1.0])
    fired, tau = monitor.observe(2.5)
    assert tau == pytest.approx(1.0 + 2.0 * 0.5)  # std 0 -> min_std
    assert fired
    # The window now holds [1, 1, 1, 2.5]: mean 1.375, std 0.6495; and the budget is spent.
    fired, tau = monitor.observe(9.0)
    assert tau == pytest.approx(max(1.375 + 2 * 0.649519, 1.8), rel=1e-4)
    assert not fired


def test_monitor_floor() -> None:
    monitor = EntropyMonitor(SRGenParams(window=2, k=0.0, min_std=0.0, min_threshold=1.8), history=[0.1, 0.1])
    assert monitor.observe(1.0) == (False, 1.8)


def test_trace_says_when_the_engine_could_not_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(EVENTS_DIR_ENV, str(tmp_path))
    call = PolicyCall("completions", {}, backend=None)
    _fill_trace(call, "d" * 32)
    assert call.trace.data["engine_events"].startswith("unavailable")
    assert call.trace.data["corrections"] is None and call.trace.corrections is None

    append_event("e" * 32, {"event": "admitted", "sequence": 0})
    append_event("e" * 32, {"event": "unavailable", "sequence": 0, "reason": "no hidden states"})
    _fill_trace(call, "e" * 32)
    assert call.trace.data["engine_events"] == "SRGen stopped early: no hidden states"
    assert call.trace.data["num_corrections"] == 0


# ---- in the engine -----------------------------------------------------------------------------------

def _complete(client: OpenAI, refine: dict, max_tokens: int = 24, **kwargs):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                     extra_body={"refine": refine}, **kwargs)


@pytest.mark.engine
def test_srgen_reports_in_engine_corrections_streaming_and_not(client: OpenAI) -> None:
    resp = _complete(client, {"policy": "srgen", "max_corrections": 2, **FORCE})
    trace = resp.model_extra["refine"]["trace"]
    assert trace["engine_events"] == "reported"
    assert trace["num_corrections"] == 2
    first, second = trace["corrections"]
    assert (first["output_index"], second["output_index"]) == (0, 1)
    assert first["entropy"] > first["threshold"] == 0.0
    assert {"id", "text", "prob"} <= set(first["token_after"])

    chunks = list(_complete(client, {"policy": "srgen", "max_corrections": 2, **FORCE}, stream=True))
    blocks = [c.model_extra["refine"] for c in chunks if c.model_extra.get("refine")]
    assert len(blocks) == 1 and blocks[0]["trace"]["num_corrections"] == 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text


@pytest.mark.engine
def test_srgen_that_never_triggers_equals_policy_none_token_for_token(client: OpenAI) -> None:
    plain = _complete(client, {"policy": "none"}, max_tokens=64, logprobs=0)
    srgen = _complete(client, {"policy": "srgen", **NEVER}, max_tokens=64, logprobs=0)
    assert srgen.model_extra["refine"]["trace"]["num_corrections"] == 0
    assert srgen.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens


@pytest.mark.engine
def test_concurrent_srgen_and_plain_requests_each_get_their_own_behaviour(client: OpenAI) -> None:
    solo = _complete(client, {"policy": "none"}).choices[0].text
    jobs = [{"policy": "srgen", "max_corrections": 1, **FORCE}, {"policy": "none"},
            {"policy": "srgen", "max_corrections": 3, **FORCE}, {"policy": "none"}]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda refine: _complete(client, refine), jobs))
    traces = [r.model_extra["refine"]["trace"] for r in results]
    assert traces[0]["num_corrections"] == 1 and traces[2]["num_corrections"] == 3
    assert traces[1] == traces[3] == {}
    assert results[1].choices[0].text == results[3].choices[0].text == solo


@pytest.mark.engine
def test_engine_correction_matches_an_independent_pytorch_recomputation(client: OpenAI, refine_server) -> None:
    """Recompute the corrected next-token distribution at the first trigger with transformers + autograd."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = SRGenParams(lr=0.1, steps=3, lam=0.05, max_corrections=1, **FORCE)
    resp = _complete(client, {"policy": "srgen", **params.model_dump()}, max_tokens=1)
    correction = resp.model_extra["refine"]["trace"]["corrections"][0]

    model_dir = _model_dir(client)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0].float()  # after the final norm
    weight = model.lm_head.weight.detach().float()

    delta = torch.zeros(hidden.shape[1], requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=params.lr, weight_decay=1e-8, eps=1e-5)
    for _ in range(params.steps):
        logits = (hidden + delta) @ weight.T
        ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        p_last = torch.softmax(logits[-1], dim=-1)  # greedy request: entropy at T=1
        entropy = -(p_last * torch.log(p_last)).sum()
        loss = (1 - params.lam) * ce + params.lam * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = torch.softmax(hidden[-1] @ weight.T, dim=-1)
        after = torch.softmax((hidden[-1] + delta) @ weight.T, dim=-1)

    # The engine's hidden states come from vLLM's kernels (float32 on a CPU without bf16 units, else bf16),
    # ours from transformers' float32 ones: allow for that.
    tol = 0.02
    assert correction["token_before"]["id"] == int(before.argmax())
    assert correction["token_before"]["prob"] == pytest.approx(float(before.max()), abs=tol)
    assert correction["token_after"]["id"] == int(after.argmax())
    assert correction["token_after"]["prob"] == pytest.approx(float(after.max()), abs=tol)
    # The comparison only means something if the correction moved the distribution by more than the tolerance.
    assert abs(float(after.max()) - float(before.max())) > 2 * tol


def _model_dir(client: OpenAI) -> str:
    """The embedded engine's model folder, as vLLM reports it in /v1/models."""
    return next(m for m in client.models.list() if m.id == MODEL).model_extra["root"]
