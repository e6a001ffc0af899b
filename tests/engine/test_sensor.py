"""The token-statistics sensor inside the real engine: its numbers match an independent recomputation over the
whole vocabulary, every choice of an n > 1 request gets its own stream, and `none` summarises them for a client
of the official openai client.

These tests run on the session's float32 engine (`float32_refine`, tests/conftest.py): the main engine computes in
bfloat16 on a CPU with bf16 units, whose logits differ from any float32 recomputation by far more than the 1e-3
the sensor is held to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch
from openai import OpenAI

from refine_server.backend import Backend
from refine_server.contract.protocol import EngineLink
from refine_server.contract.protocol import TOKEN_STATS
from refine_server.metrics import Metrics
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.none import NonePolicy
from tests.conftest import ENGINE_EVENTS_DIR, ENGINE_SECRET, FLOAT32_ENGINE_PORT, MODEL, policy_call

PROMPT = "The three primary colours are"

pytestmark = pytest.mark.engine


@pytest.fixture
async def engine(float32_refine: str) -> AsyncIterator[EngineClient]:
    """An EngineClient on the float32 engine, as a policy gets one from refine."""
    backend = Backend(f"http://127.0.0.1:{FLOAT32_ENGINE_PORT}", Metrics({"none": NonePolicy.metrics}),
                      timeout_s=120, link=EngineLink(secret=ENGINE_SECRET, events_dir=ENGINE_EVENTS_DIR))
    try:
        yield policy_call("completions", {"model": MODEL, "prompt": PROMPT}, backend).engine
    finally:
        await backend.aclose()


async def test_the_handshake_says_the_engine_reports_token_stats(engine: EngineClient) -> None:
    assert await engine.token_stats_unavailable() is None
    assert TOKEN_STATS in (await engine.plugin()).handshake.policies


async def test_greedy_token_stats_match_a_transformers_recomputation_over_the_whole_vocabulary(
        engine: EngineClient, float32_client: OpenAI) -> None:
    from transformers import AutoModelForCausalLM

    response, stats = await engine.completions_with_token_stats("test", PROMPT, max_tokens=12, temperature=0)
    (choice,) = response["choices"]
    got = stats[0]
    assert got.missing == 0 and got.token_ids == choice["token_ids"] and len(got.token_ids) == 12

    model = AutoModelForCausalLM.from_pretrained(_model_dir(float32_client), dtype=torch.float32).eval()
    ids = torch.tensor([choice["prompt_token_ids"] + choice["token_ids"]])
    prompt_len = len(choice["prompt_token_ids"])
    with torch.no_grad():
        logits = model(ids).logits[0, prompt_len - 1: -1]  # row j: the distribution token j was drawn from
    log_p = torch.log_softmax(logits.double(), dim=-1)  # greedy: measured at T = 1
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    varentropy = (p * (log_p + entropy[:, None]) ** 2).sum(dim=-1)
    top2 = p.topk(2, dim=-1).values
    drawn = p[torch.arange(len(got.token_ids)), torch.tensor(got.token_ids)]

    torch.testing.assert_close(torch.tensor(got.entropy, dtype=torch.float64), entropy, rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.tensor(got.varentropy, dtype=torch.float64), varentropy, rtol=0, atol=1e-2)
    torch.testing.assert_close(torch.tensor(got.margin, dtype=torch.float64), top2[:, 0] - top2[:, 1],
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.tensor(got.prob, dtype=torch.float64), drawn, rtol=0, atol=1e-3)
    # Greedy decoding draws the most likely token: its probability is the top one.
    torch.testing.assert_close(torch.tensor(got.prob, dtype=torch.float64), top2[:, 0], rtol=0, atol=1e-3)
    # The comparison means something only if the distributions differ from token to token.
    assert float(entropy.max() - entropy.min()) > 0.5


async def test_each_choice_of_an_n2_request_gets_its_own_stream(engine: EngineClient) -> None:
    response, stats = await engine.completions_with_token_stats("test", PROMPT, n=2, max_tokens=16,
                                                                temperature=1.0)
    choices = {c["index"]: c["token_ids"] for c in response["choices"]}
    assert choices[0] != choices[1], "both choices drew the same tokens: the test lost its point"
    for index, ids in choices.items():
        assert stats[index].token_ids == ids and stats[index].missing == 0
        assert all(0 < p <= 1 for p in stats[index].prob)
    assert stats[0].entropy != stats[1].entropy


def test_none_summarises_each_choices_token_stats_for_the_official_client(float32_client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = float32_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    resp = float32_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"refine": {"policy": "none", "token_stats": True}})
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert "token_ids" not in (resp.choices[0].model_extra or {})  # the sensor needed them, the client did not ask
    trace = resp.model_extra["refine"]["trace"]
    assert trace["token_stats"] == "reported"
    (summary,) = trace["choices"]
    assert summary["index"] == 0 and summary["tokens"] == resp.usage.completion_tokens
    assert 0 <= summary["mean_entropy"] <= summary["max_entropy"]

    two = float32_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, n=2,
                                         extra_body={"refine": {"policy": "none", "token_stats": True}})
    summaries = two.model_extra["refine"]["trace"]["choices"]
    assert [s["index"] for s in summaries] == [0, 1] and all("missing" not in s for s in summaries)
    assert sum(s["tokens"] for s in summaries) == two.usage.completion_tokens


def _model_dir(client: OpenAI) -> str:
    """The embedded engine's model folder, as vLLM reports it in /v1/models."""
    return next(m for m in client.models.list() if m.id == MODEL).model_extra["root"]
