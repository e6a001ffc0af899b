"""What a client learns of a policy without reading the body's `refine` block: a 400 naming a field the policy
cannot honour (CyberV and RAIN write their own answers: no tools, no logprobs), and the summary headers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies.request import ClientRequest
from tests.fake_vllm import MODEL, serve_in_thread

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


@pytest.fixture(scope="module")
def builtin_proxy(fake_backend: str) -> Iterator[str]:
    """refine with its real policies: the refusals happen before a policy calls the (fake) backend."""
    with serve_in_thread(create_app(Settings(backend_url=[fake_backend]))) as url:
        yield url


@pytest.mark.parametrize("policy", ["cyberv", "rain"])
@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", TOOLS),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 2),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_policy_refuses_a_chat_field_it_cannot_honour_naming_it(
    builtin_proxy: str, policy: str, field: str, value: Any, stream: bool
) -> None:
    body = {**CHAT, field: value, "stream": stream, "refine": {"policy": policy}}
    resp = httpx.post(f"{builtin_proxy}/v1/chat/completions", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert f"policy {policy!r} cannot honour {field!r}" in error["message"]


@pytest.mark.parametrize("policy", ["cyberv", "rain"])
@pytest.mark.parametrize("field, value", [("logprobs", 0), ("echo", True)])
def test_a_policy_refuses_a_completions_field_it_cannot_honour(
    builtin_proxy: str, policy: str, field: str, value: Any
) -> None:
    body = {"model": MODEL, "prompt": "2 + 2 =", field: value, "refine": {"policy": policy}}
    resp = httpx.post(f"{builtin_proxy}/v1/completions", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field


def test_a_policy_that_relays_the_request_passes_those_fields_on(builtin_proxy: str) -> None:
    """`none` forwards logprobs (and tools) to vLLM, which answers them."""
    resp = httpx.post(
        f"{builtin_proxy}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "logprobs": 2, "refine": {"policy": "none"}},
    )
    assert resp.status_code == 200


@pytest.mark.parametrize(
    "field, value, asks",
    [
        ("tools", TOOLS, True),
        ("tools", [], False),
        ("tools", None, False),
        ("tool_choice", "auto", True),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}, True),
        ("tool_choice", "none", False),
        ("response_format", {"type": "json_schema", "json_schema": {}}, True),
        ("response_format", {"type": "text"}, False),
        ("logprobs", True, True),
        ("logprobs", False, False),
        ("logprobs", 0, True),
        ("top_logprobs", 0, True),
    ],
)
def test_what_counts_as_asking_for_a_field(field: str, value: Any, asks: bool) -> None:
    """Values that ask for nothing, which clients such as LangChain send by default, are not refused."""
    request = ClientRequest(
        endpoint="chat",
        body={field: value},
        model=MODEL,
        n=1,
        max_tokens=None,
        seed=None,
        stop=[],
        stream=False,
        include_usage=False,
        messages=[],
        prompt=None,
    )
    assert request.asks_for(field) is asks


def test_headers_carry_the_policy_and_the_counts_it_recorded(client: OpenAI) -> None:
    plain = client.completions.with_raw_response.create(model=MODEL, prompt="hi")
    assert plain.headers["x-refine-policy"] == "none"
    assert not [h for h in plain.headers if h.startswith("x-refine-") and h != "x-refine-policy"]

    counted = client.completions.with_raw_response.create(
        model=MODEL, prompt="hi", extra_body={"refine": {"policy": "counting"}}
    )
    assert counted.headers["x-refine-policy"] == "counting"
    assert counted.headers["x-refine-corrections"] == "2" and counted.headers["x-refine-rounds"] == "1"
    assert counted.parse().model_extra["refine"]["policy"] == "counting"


def test_a_stream_carries_only_the_policy_header(proxy: str) -> None:
    """A stream's headers leave before the policy's work: its counts are in the final chunk's refine block."""
    body = {"model": MODEL, "prompt": "hi", "stream": True, "refine": {"policy": "counting"}}
    with httpx.stream("POST", f"{proxy}/v1/completions", json=body) as resp:
        resp.read()
    assert resp.status_code == 200
    assert resp.headers["x-refine-policy"] == "counting"
    assert "x-refine-corrections" not in resp.headers
