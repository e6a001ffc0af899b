"""The token-statistics sensor inside the real engine: its numbers match an independent recomputation over the
whole vocabulary, every choice of an n > 1 request gets its own stream, and `none` summarises them for a client
of the official openai client.

These tests run on conftest's float32 engine: the session's engine computes in bfloat16 on a CPU with bf16 units,
whose logits differ from any float32 recomputation by far more than the 1e-3 the sensor is held to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import OpenAI

from refine_server.contract.protocol import TOKEN_STATS
from refine_server.policies.engine_client import EngineClient
from tests.conftest import (
    ENGINE_PORT,
    FLOAT32_PORT_OFFSET,
    MODEL,
    RunningServer,
    engine_client_on,
)
from tests.engine.reference import assert_token_stats_match, load_float32, model_dir

PROMPT = "The three primary colours are"

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(float32_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{float32_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def engine(float32_server: RunningServer) -> AsyncIterator[EngineClient]:
    """An EngineClient on the float32 engine, as a policy gets one from refine."""
    async with engine_client_on(ENGINE_PORT + FLOAT32_PORT_OFFSET, PROMPT, timeout_s=120) as engine:
        yield engine


async def test_the_handshake_says_the_engine_reports_token_stats(engine: EngineClient) -> None:
    assert await engine.token_stats_unavailable() is None
    assert TOKEN_STATS in (await engine.plugin()).handshake.policies


async def test_greedy_token_stats_match_a_transformers_recomputation_over_the_whole_vocabulary(
    engine: EngineClient, client: OpenAI
) -> None:
    response, stats = await engine.completions_with_token_stats("test", PROMPT, max_tokens=12, temperature=0)
    (choice,) = response["choices"]
    got = stats[0]
    assert got.missing == 0 and got.token_ids == choice["token_ids"] and len(got.token_ids) == 12
    assert_token_stats_match(load_float32(model_dir(client, MODEL)), choice, got)


async def test_each_choice_of_an_n2_request_gets_its_own_stream(engine: EngineClient) -> None:
    response, stats = await engine.completions_with_token_stats("test", PROMPT, n=2, max_tokens=16, temperature=1.0)
    choices = {c["index"]: c["token_ids"] for c in response["choices"]}
    assert choices[0] != choices[1], "both choices drew the same tokens: the test lost its point"
    for index, ids in choices.items():
        assert stats[index].token_ids == ids and stats[index].missing == 0
        assert all(0 < p <= 1 for p in stats[index].prob)
    assert stats[0].entropy != stats[1].entropy


def test_none_summarises_each_choices_token_stats_for_the_official_client(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    resp = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        extra_body={"refine": {"policy": "none", "token_stats": True}},
    )
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert "token_ids" not in (resp.choices[0].model_extra or {})  # the sensor needed them, the client did not ask
    trace = resp.model_extra["refine"]["trace"]
    assert trace["token_stats"] == "reported"
    (summary,) = trace["choices"]
    assert summary["index"] == 0 and summary["tokens"] == resp.usage.completion_tokens
    assert 0 <= summary["mean_entropy"] <= summary["max_entropy"]

    two = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=1.0,
        n=2,
        extra_body={"refine": {"policy": "none", "token_stats": True}},
    )
    summaries = two.model_extra["refine"]["trace"]["choices"]
    assert [s["index"] for s in summaries] == [0, 1] and all("missing" not in s for s in summaries)
    assert sum(s["tokens"] for s in summaries) == two.usage.completion_tokens
