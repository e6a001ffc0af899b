"""The SSE relay: a stream whose policy does not change it goes out as the backend sent it, and every way a
stream can fail ends it with an OpenAI error, never a hang."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.config import Settings
from tests.fake_vllm import MODEL
from tests.fake_vllm import app as fake_vllm_app
from tests.unit.proxy.helpers import _serve


def _events(url: str, body: dict) -> list[bytes]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        return [event for event in resp.read().split(b"\n\n") if event]


def test_a_relayed_stream_is_the_backends_byte_for_byte_but_the_refine_block(proxy: str, fake_backend: str) -> None:
    body = {"model": MODEL, "prompt": ["a", "b"], "stream": True}
    direct, relayed = _events(fake_backend, body), _events(proxy, body)
    assert len(relayed) == len(direct) == 7  # three tokens for each of two prompts, then [DONE]
    differing = [(d, r) for d, r in zip(direct, relayed, strict=True) if d != r]
    assert len(differing) == 1  # the chunk that finishes the last choice, and only it
    upstream, ours = (json.loads(event.removeprefix(b"data: ")) for event in differing[0])
    assert ours.pop("refine")["policy"] == "none"
    assert ours == upstream


def test_a_relayed_streams_headers_come_when_the_engine_accepts_it_not_with_its_first_token(proxy: str) -> None:
    """vLLM answers 200 at once and streams after prefill; refine's headers follow its 200, so a client has
    them before the first token. The fake holds its first token until the headers have come (a refine that
    waited for that token would leave this test to the client's timeout)."""
    body = {"model": MODEL, "prompt": "HOLD_FIRST", "stream": True}
    fake_vllm_app.state.release_first.clear()
    try:
        with httpx.stream("POST", f"{proxy}/v1/completions", json=body, timeout=10) as resp:
            assert resp.status_code == 200 and resp.headers["x-refine-policy"] == "none"
            fake_vllm_app.state.release_first.set()
            events = [event for event in resp.read().split(b"\n\n") if event]
    finally:
        fake_vllm_app.state.release_first.set()
    assert b'"text":"alpha"' in events[0] and events[-1] == b"data: [DONE]"


def test_a_backend_that_drops_the_stream_ends_it_with_an_openai_error(proxy: str) -> None:
    # A hang would end in the client's own timeout instead, whose message does not match.
    client = OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="backend unavailable"):
        for _ in client.completions.create(model=MODEL, prompt="DROP_MIDSTREAM", stream=True):
            pass


def test_a_policy_that_fails_mid_stream_ends_it_with_an_error_and_is_counted(client: OpenAI, proxy: str) -> None:
    def failures() -> float:
        return _requests(proxy, 'policy="broken"', 'status="500"')

    before = failures()
    chunks = []
    with pytest.raises(openai.APIError, match="internal error while streaming"):
        for chunk in client.completions.create(
            model=MODEL, prompt="hi", stream=True, extra_body={"refine": {"policy": "broken"}}
        ):
            chunks.append(chunk)
    assert len(chunks) == 1 and failures() == before + 1


def test_a_streaming_request_the_policy_refuses_is_an_http_400_not_a_stream(proxy: str) -> None:
    body = {"model": MODEL, "prompt": "no thanks", "stream": True, "refine": {"policy": "picky"}}
    resp = httpx.post(f"{proxy}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 400 and resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["param"] == "prompt"


def test_a_backend_slower_than_the_upstream_timeout_is_a_504(fake_backend: str) -> None:
    with _serve(Settings(backend_url=fake_backend, upstream_timeout_s=0.5)) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "SLOW"}, timeout=30)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "backend_timeout"


def _requests(proxy: str, *labels: str) -> float:
    text = httpx.get(f"{proxy}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("refine_requests_total{") and all(label in line for label in labels)
    )
