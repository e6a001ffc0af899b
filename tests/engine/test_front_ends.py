"""The Responses and Messages APIs on the real engine, through the official openai and anthropic SDKs, for
every policy: `none` and `srgen` relayed to vLLM's own endpoints, CyberV and RAIN translated to chat and
written back in each API's shape. An OpenAI Agents SDK agent calls a function tool through refine."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from openai import OpenAI

from tests.conftest import MODEL, RunningServer

QUESTION = "What is 2 + 3? Answer with a number."
# Small budgets: the point is the API's shape around each policy, not the policy's quality.
POLICIES = {
    "none": {"policy": "none"},
    "srgen": {"policy": "srgen", "max_corrections": 1},
    "cyberv": {"policy": "cyberv", "n": 2, "max_reasoning_tokens": 16, "max_feedback_tokens": 8},
    "rain": {"policy": "rain", "max_iterations_per_commit": 2, "min_iterations_per_commit": 1, "max_engine_calls": 60},
}


@pytest.fixture(scope="module")
def anthropic_client(refine_server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=refine_server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("policy", POLICIES)
def test_responses_create_plain_and_streamed_for_every_policy(client: OpenAI, policy: str) -> None:
    refine = POLICIES[policy]
    resp = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0, extra_body={"refine": refine}
    )
    assert resp.output_text.strip() and resp.status in ("completed", "incomplete")
    assert resp.usage.output_tokens > 0 and resp.model_extra["refine"]["policy"] == policy

    events = list(
        client.responses.create(
            model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0, stream=True, extra_body={"refine": refine}
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed and streamed == events[-1].response.output_text
    assert events[-1].model_extra["refine"]["policy"] == policy


@pytest.mark.parametrize("policy", POLICIES)
def test_messages_create_and_stream_for_every_policy(anthropic_client: anthropic.Anthropic, policy: str) -> None:
    refine = POLICIES[policy]
    messages = [{"role": "user", "content": QUESTION}]
    # This SDK's create() takes no temperature (newer Claude models have none); vLLM's endpoint does.
    extra = {"refine": refine, "temperature": 0}
    message = anthropic_client.messages.create(model=MODEL, max_tokens=12, messages=messages, extra_body=extra)
    assert message.content[0].text.strip() and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0 and message.model_extra["refine"]["policy"] == policy

    with anthropic_client.messages.stream(model=MODEL, max_tokens=12, messages=messages, extra_body=extra) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and final.content[0].text == streamed


def test_srgen_corrects_through_the_responses_api(client: OpenAI) -> None:
    """The relayed Responses request carries SRGen's signed arguments: the engine reports its corrections."""
    force = {"warmup_threshold": 0, "min_threshold": 0, "k": 0, "min_std": 0}
    resp = client.responses.create(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=6,
        temperature=0,
        extra_body={"refine": {"policy": "srgen", "max_corrections": 2, **force}},
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["engine_events"] == "reported" and trace["num_corrections"] == 2


def test_a_relayed_response_stream_is_the_engines_but_the_refine_block(
    refine_server: RunningServer, engine_url: str
) -> None:
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 8, "temperature": 0, "stream": True}

    def events(url: str) -> list[bytes]:
        with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=120) as resp:
            return [e for e in b"".join(resp.iter_bytes()).split(b"\n\n") if e]

    direct, relayed = events(engine_url), events(refine_server.url)
    # Ids and timestamps differ between two runs; the events' names and kinds do not, nor the text.
    assert [e.partition(b"\n")[0] for e in relayed] == [e.partition(b"\n")[0] for e in direct]
    assert b'"refine":' in relayed[-1] and not any(b'"refine":' in e for e in relayed[:-1])


def test_an_agents_sdk_agent_calls_a_function_tool_through_refine(refine_server: RunningServer) -> None:
    """The OpenAI Agents SDK's default model speaks the Responses API: with a required tool call, the agent
    calls the function and stops with its output."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
    from openai import AsyncOpenAI

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = OpenAIResponsesModel(
        model=MODEL, openai_client=AsyncOpenAI(base_url=f"{refine_server.url}/v1", api_key="unused", max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="Use the tool.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_sync(
        agent, "What is the weather in Paris?", max_turns=2, run_config=RunConfig(tracing_disabled=True)
    )
    assert len(calls) == 1 and result.final_output == f"sunny in {calls[0]}"
