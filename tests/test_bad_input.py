"""Bad input through refine to the real engine: a clear OpenAI error with the right status, never a hang."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.engine

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
    ids=["malformed", "not-object", "missing-messages", "n-string", "temperature", "max-tokens-0",
         "max-tokens-over-limit", "unknown-policy", "unknown-param", "refine-not-object", "unknown-model"],
)
def test_chat_rejects_bad_input(refine_server, body, status: int, param: str | None) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(f"{refine_server.url}/v1/chat/completions", timeout=30,
                      headers={"content-type": "application/json"}, **kwargs)
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
