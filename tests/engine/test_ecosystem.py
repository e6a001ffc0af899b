"""Agent clients against refine on the real embedded vLLM: tool requests (the embedded engine starts with the
bundled model's tool-call parser), the summary headers, and LangChain's ChatOpenAI, which keeps only the
response fields it knows (so it sees refine's work through the headers)."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.conftest import MODEL, RunningServer

pytestmark = pytest.mark.engine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("policy", ["none", "srgen"])
def test_a_tool_request_is_accepted_and_answered_in_openais_shape(client: OpenAI, policy: str) -> None:
    """The 135M model may or may not call the tool; vLLM must accept the request and answer well-formed."""
    resp = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        max_tokens=48,
        temperature=0,
        extra_body={"refine": {"policy": policy}},
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    if not choice.message.tool_calls:
        assert isinstance(choice.message.content, str)
    assert resp.model_extra["refine"]["policy"] == policy


def test_a_required_tool_call_comes_back_parsed(client: OpenAI) -> None:
    """tool_choice="required": vLLM constrains the output to a call, and its parser turns it into tool_calls."""
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0
    )
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_policy_that_writes_its_own_answer_refuses_tools(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER], max_tokens=8, extra_body={"refine": {"policy": "cyberv"}}
        )
    assert err.value.body["param"] == "tools"


def test_headers_summarise_a_real_response(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, extra_body={"refine": {"policy": "srgen"}}
    )
    assert raw.headers["x-refine-policy"] == "srgen"
    trace = raw.parse().model_extra["refine"]["trace"]
    assert raw.headers["x-refine-corrections"] == str(trace["num_corrections"])

    streamed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, stream=True
    )
    assert streamed.headers["x-refine-policy"] == "none"
    assert "x-refine-corrections" not in streamed.headers
    assert [c for c in streamed.parse() if c.choices]


# ---- LangChain ---------------------------------------------------------------------------------------------


def _chat_openai(refine_server: RunningServer, **kwargs):
    import langchain_openai  # in the test extra: a missing one is a failure, not a skip

    settings = {"temperature": 0, "max_tokens": 16, "max_retries": 0, "timeout": 120, **kwargs}
    return langchain_openai.ChatOpenAI(
        base_url=f"{refine_server.url}/v1", api_key="unused", model=MODEL, include_response_headers=True, **settings
    )


def test_langchain_invoke_and_stream_see_the_policy_in_the_headers(refine_server: RunningServer) -> None:
    llm = _chat_openai(refine_server, extra_body={"refine": {"policy": "none"}})
    message = llm.invoke("What is the capital of France?")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["headers"]["x-refine-policy"] == "none"

    chunks = list(llm.stream("What is the capital of France?"))
    assert "".join(c.content for c in chunks) == message.content
    assert any(c.response_metadata.get("headers", {}).get("x-refine-policy") == "none" for c in chunks)


def test_langchain_bind_tools_gets_tool_calls(refine_server: RunningServer) -> None:
    llm = _chat_openai(refine_server, max_tokens=64)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"], dict)


def test_langchain_structured_output_through_refine(refine_server: RunningServer) -> None:
    """vLLM's guided decoding answers in the schema, with refine in between (`none` relays response_format)."""
    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        country: str

    llm = _chat_openai(refine_server, max_tokens=60, extra_body={"refine": {"policy": "none"}})
    place = llm.with_structured_output(Place, method="json_schema").invoke("Name a city in France and its country.")
    assert isinstance(place, Place) and place.city and place.country
