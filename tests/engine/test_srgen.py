"""SRGen inside the real engine: corrections reach the output, match an independent recomputation, hold the
engine's masks, cover every choice, and never take the engine down."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from refine_server.contract.params import SRGenParams
from refine_server.contract.protocol import FAULT_ARG, read_events, signed_xargs
from refine_server.policies.srgen import _fill_trace
from tests.conftest import ENGINE_EVENTS_DIR, ENGINE_SECRET, MODEL, RunningServer, metric_total, policy_call
from tests.engine.reference import assert_correction_matches, load_float32, model_dir, srgen_distributions

# Thresholds of zero make every monitored token trigger: the first token after the prompt is never monitored
# (as in the official code), so corrections land on output indices 1, 2, ... up to the budget.
FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}
NEVER = {"warmup_threshold": 1e9, "min_threshold": 1e9}
PROMPT = "The three primary colours are"

pytestmark = pytest.mark.engine


def _complete(client: OpenAI, refine: dict, max_tokens: int = 24, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=max_tokens,
        extra_body={"refine": refine, **kwargs.pop("extra_body", {})},
        **kwargs,
    )


def _trace(resp) -> dict:
    return resp.model_extra["refine"]["trace"]


def test_srgen_reports_in_engine_corrections_streaming_and_not(client: OpenAI) -> None:
    resp = _complete(client, {"policy": "srgen", "max_corrections": 2, **FORCE})
    trace = _trace(resp)
    assert trace["engine_events"] == "reported"
    assert [c["output_index"] for c in trace["corrections"]] == [1, 2]
    first = trace["corrections"][0]
    assert first["entropy"] > first["threshold"] == 0.0
    assert {"id", "text", "prob"} <= set(first["token_after"])

    chunks = list(_complete(client, {"policy": "srgen", "max_corrections": 2, **FORCE}, stream=True))
    blocks = [c.model_extra["refine"] for c in chunks if c.model_extra.get("refine")]
    assert len(blocks) == 1 and blocks[0]["trace"]["num_corrections"] == 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text


def test_srgen_that_never_triggers_equals_policy_none_token_for_token(client: OpenAI) -> None:
    plain = _complete(client, {"policy": "none"}, max_tokens=64, logprobs=0)
    srgen = _complete(client, {"policy": "srgen", **NEVER}, max_tokens=64, logprobs=0)
    assert _trace(srgen)["num_corrections"] == 0
    assert srgen.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens


def test_concurrent_srgen_and_plain_requests_each_get_their_own_behaviour(client: OpenAI) -> None:
    jobs = [
        {"policy": "srgen", "max_corrections": 1, **FORCE},
        {"policy": "none"},
        {"policy": "srgen", "max_corrections": 3, **FORCE},
        {"policy": "none"},
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda refine: _complete(client, refine), jobs))
    traces = [_trace(r) for r in results]
    assert traces[0]["num_corrections"] == 1 and traces[2]["num_corrections"] == 3
    assert traces[1] == traces[3] == {}


def test_a_correction_reaches_the_output_and_matches_an_independent_recomputation(
    float32_server: RunningServer,
) -> None:
    """The third correction (output index 3) recomputed with transformers + autograd from the token ids the
    engine returned: the corrected distribution's top token and probability agree, and it is the token emitted.
    On conftest's float32 engine: in bf16 the gradient's small coordinates change sign, and AdamW's first steps
    (about lr per coordinate, whatever the gradient's size) carry that into a different correction."""
    client = OpenAI(base_url=f"{float32_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    params = SRGenParams(lr=0.5, steps=3, lam=0.05, max_corrections=3, **FORCE)
    resp = _complete(
        client, {"policy": "srgen", **params.model_dump()}, max_tokens=6, extra_body={"return_token_ids": True}
    )
    correction = _trace(resp)["corrections"][2]
    assert correction["output_index"] == 3
    output_ids = resp.choices[0].model_extra["token_ids"]
    # Greedy decoding emits the corrected distribution's top token: the correction reached the output.
    assert output_ids[3] == correction["token_after"]["id"]

    model = load_float32(model_dir(client, MODEL))
    context = resp.choices[0].model_extra["prompt_token_ids"] + output_ids[:3]
    before, after = srgen_distributions(model, context, params)
    # Both sides compute in float32; what is left is vLLM's kernels against transformers'.
    assert_correction_matches(correction, before, after, tol=0.01)


def test_every_choice_of_an_n2_request_is_corrected(client: OpenAI) -> None:
    resp = _complete(client, {"policy": "srgen", "max_corrections": 2, **FORCE}, n=2, temperature=0.8, seed=7)
    trace = _trace(resp)
    assert trace["sequences"] == 2 and trace["engine_events"] == "reported"
    by_choice = sorted((c["sequence"], c["output_index"]) for c in trace["corrections"])
    assert by_choice == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_logit_bias_still_holds_under_forced_corrections(client: OpenAI) -> None:
    """A correction is added to the engine's logits, so a token the client biased away stays away."""
    refine = {"policy": "srgen", "max_corrections": 1, **FORCE}
    first = _complete(client, refine, max_tokens=3, extra_body={"return_token_ids": True})
    corrected = _trace(first)["corrections"][0]["token_after"]["id"]
    assert first.choices[0].model_extra["token_ids"][1] == corrected
    banned = _complete(
        client, refine, max_tokens=3, logit_bias={str(corrected): -100}, extra_body={"return_token_ids": True}
    )
    assert banned.choices[0].model_extra["token_ids"][1] != corrected
    assert _trace(banned)["corrections"][0]["token_after"]["id"] != corrected


def test_a_failing_correction_leaves_the_engine_serving_and_the_trace_says_why(engine_url: str, client: OpenAI) -> None:
    """Faults are injected through a signed request straight to the test engine (which allows them)."""
    xargs = signed_xargs(ENGINE_SECRET, "srgen", json.dumps({"max_corrections": 2, **FORCE}))
    xargs[FAULT_ARG] = "correction"
    key = xargs["refine_request_key"]
    resp = httpx.post(
        f"{engine_url}/v1/completions",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 5,
            "temperature": 0,
            "vllm_xargs": xargs,
            "cache_salt": key,
        },
    )
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"]
    events = read_events(ENGINE_EVENTS_DIR, key)
    assert events is not None
    failed = [e for e in events if e["event"] == "failed"]
    assert len(failed) == 1 and "injected fault" in failed[0]["reason"]

    call = policy_call("completions", {"model": MODEL, "prompt": PROMPT}, backend=None)
    _fill_trace(call, ENGINE_EVENTS_DIR, key)
    assert call.trace.data["engine_events"].startswith("SRGen stopped early: a correction failed")
    # And the engine keeps serving SRGen for everyone else.
    assert _trace(_complete(client, {"policy": "srgen", "max_corrections": 1, **FORCE}))["num_corrections"] == 1


def test_a_preempted_request_keeps_its_srgen_state_and_keeps_correcting(engine_url: str) -> None:
    """Four long prompts overflow the test engine's KV cache (conftest's ENGINE_KV_BLOCKS), so vLLM preempts the
    latest one: it leaves the batch, loses its KV blocks, and is re-added once another request finishes (the path a
    request the scheduler skips for a step takes too). Its SRGen sequence comes back with history and budget:
    every monitored token is corrected once, before and after the preemption, none repeated and none missing."""
    # ~500 tokens: four take 64 of the 66 blocks, and the latest is preempted when they cross 512.
    prompt = "Count the apples in each basket and write the total. " * 45
    prompt_len = len(httpx.post(f"{engine_url}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"])
    budget = 24

    def run(_: int) -> list[dict]:
        # A window longer than the run keeps the (zero) warm-up threshold for every token.
        forced = {"max_corrections": budget, "window": budget + 8, "steps": 1, **FORCE}
        xargs = signed_xargs(ENGINE_SECRET, "srgen", json.dumps(forced))
        resp = httpx.post(
            f"{engine_url}/v1/completions",
            timeout=600,
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": budget + 8,
                "temperature": 0,
                "ignore_eos": True,
                "vllm_xargs": xargs,
                "cache_salt": xargs["refine_request_key"],
            },
        )
        assert resp.status_code == 200
        return read_events(ENGINE_EVENTS_DIR, xargs["refine_request_key"])

    preempted_before = _preemptions(engine_url)
    with ThreadPoolExecutor(4) as pool:
        traces = list(pool.map(run, range(4)))
    assert _preemptions(engine_url) > preempted_before, "vLLM preempted nothing: the test lost its point"
    for events in traces:
        assert [e["event"] for e in events if e["event"] != "correction"] in (["admitted"], ["admitted", "rejoined"])
        assert [e["output_index"] for e in events if e["event"] == "correction"] == list(range(1, budget + 1))
    rejoins = [(events, i) for events in traces for i, e in enumerate(events) if e["event"] == "rejoined"]
    assert rejoins
    for events, at in rejoins:
        assert events[at]["filled"] > prompt_len  # preempted mid-generation, not during the prompt
        assert any(e["event"] == "correction" for e in events[at:])  # and corrected after coming back


def _preemptions(engine_url: str) -> float:
    return metric_total(httpx.get(f"{engine_url}/metrics").text, "vllm:num_preemptions_total")
