"""The official openai client against refine on the real embedded vLLM: refine answers as vLLM does. Bad input
through refine to the real engine: a clear OpenAI error with the right status, never a hang."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import OpenAI

from tests.conftest import MODEL, metric_total

pytestmark = pytest.mark.engine


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_embedded_model(client: OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_matches_the_engine_and_carries_the_refine_block(client: OpenAI, engine_url: str) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    direct = OpenAI(base_url=f"{engine_url}/v1", api_key="x").chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert resp.choices[0].message.content == direct.choices[0].message.content
    assert resp.usage.completion_tokens == direct.usage.completion_tokens
    assert resp.model_extra["refine"] == {"policy": "none", "params": {"token_stats": False}, "trace": {}}


def test_chat_forwards_sampling_fields_to_the_engine(client: OpenAI) -> None:
    """A constructed answer, not a probed one: logit_bias forces one token whatever the model prefers."""
    from transformers import AutoTokenizer

    model_dir = next(m for m in client.models.list() if m.id == MODEL).model_extra["root"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (forced,) = tokenizer.encode(" Paris", add_special_tokens=False)
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert resp.choices[0].message.content == tokenizer.decode([forced] * 3)
    assert resp.choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream_and_reports_usage(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"refine": {"policy": "none"}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    blocks = [c.model_extra["refine"] for c in chunks if c.model_extra.get("refine")]
    assert blocks == [{"policy": "none", "params": {"token_stats": False}, "trace": {}}]


def test_completions_with_logprobs_stop_and_n(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, logprobs=2, stop=["7"]
    )
    choice = resp.choices[0]
    assert "5" in choice.text and "7" not in choice.text
    assert choice.finish_reason == "stop"
    assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) > 0

    many = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0, seed=7)
    again = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0, seed=7
    )
    assert len(many.choices) == 3
    assert [c.text for c in many.choices] == [c.text for c in again.choices]


def test_completions_stream_with_n_puts_the_refine_block_after_both_choices(client: OpenAI) -> None:
    chunks = list(
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, temperature=1.0, seed=1, stream=True)
    )
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 2
    assert [c.model_extra.get("refine") is not None for c in finished] == [False, True]


def test_chat_logprobs_parse(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in content)


def test_stream_is_not_buffered(refine_server, engine_url: str) -> None:
    """Tokens must reach the client as they are made, not in one burst at the end: the first chunk arrives
    while the engine is still generating the request (read from the engine's own counters, not clocks)."""
    body = {
        "model": MODEL,
        "prompt": "Write a story about a dog:",
        "max_tokens": 400,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    chunks = 0
    with httpx.stream("POST", f"{refine_server.url}/v1/completions", json=body, timeout=300) as resp:
        assert resp.headers["cache-control"] == "no-cache"
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunks += 1
            if chunks == 1:
                engine = httpx.get(f"{engine_url}/metrics").text
                assert metric_total(engine, "vllm:num_requests_running") >= 1, (
                    "the stream arrived after the engine finished"
                )
                generated_at_first_chunk = metric_total(engine, "vllm:generation_tokens_total")
    assert chunks == 400
    assert (
        metric_total(httpx.get(f"{engine_url}/metrics").text, "vllm:generation_tokens_total")
        >= generated_at_first_chunk + 300
    )  # most of the answer was generated after the first chunk arrived


# ---- bad input -------------------------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": MODEL}, 400, "messages"),
        ({**CHAT, "n": "2"}, 400, "n"),
        ({**CHAT, "temperature": 9}, 400, "temperature"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
        ({**CHAT, "refine": {"policy": "nosuch"}}, 400, "refine.policy"),
        ({**CHAT, "refine": {"policy": "none", "typo": 1}}, 400, "refine.typo"),
        ({**CHAT, "refine": "none"}, 400, "refine"),
        ({**CHAT, "model": "not-a-model"}, 404, "model"),
    ],
    ids=[
        "malformed",
        "not-object",
        "missing-messages",
        "n-string",
        "temperature",
        "max-tokens-0",
        "max-tokens-over-limit",
        "unknown-policy",
        "unknown-param",
        "refine-not-object",
        "unknown-model",
    ],
)
def test_chat_rejects_bad_input(refine_server, body, status: int, param: str | None) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(
        f"{refine_server.url}/v1/chat/completions", timeout=30, headers={"content-type": "application/json"}, **kwargs
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_a_400(refine_server, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 4, "stream": stream}
    resp = httpx.post(f"{refine_server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert "context length" in resp.json()["error"]["message"]


def test_max_tokens_beyond_the_context_is_a_400(refine_server) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2500}  # under refine's limit, over the 2048 context
    resp = httpx.post(f"{refine_server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_answer_in_openai_format(refine_server) -> None:
    assert httpx.get(f"{refine_server.url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{refine_server.url}/v1/completions").status_code == 405


def test_a_burst_of_seeded_sampled_requests_does_not_kill_the_engine(refine_server) -> None:
    """vLLM 0.32's CPU runner dies when a seeded, sampled request's prefill is split over steps; refine starts
    the embedded engine so that no prefill is split (refine_server/engine.py). 40 prompts of ~80 tokens at
    once exceed one step's 2048-token budget, which split them before."""
    from openai import AsyncOpenAI

    async def burst() -> list[object]:
        client = AsyncOpenAI(base_url=f"{refine_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        question = "Tell me about the history of the number seven and its many uses. " * 6

        async def one(i: int) -> int:
            resp = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Question {i}: {question}"}],
                n=7,
                temperature=1.0,
                seed=i,
                max_tokens=4,
            )
            return len(resp.choices)

        return await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)

    restarts = metric_total(httpx.get(f"{refine_server.url}/metrics").text, "refine_engine_restarts_total")
    assert asyncio.run(burst()) == [7] * 40
    assert metric_total(httpx.get(f"{refine_server.url}/metrics").text, "refine_engine_restarts_total") == restarts
