"""The Responses and Messages APIs in front of the fake vLLM, through the official openai and anthropic SDKs:
relayed as vLLM sent them for `none`, translated for a policy that writes its own answer (`echo`), and
errors in each API's own shape. tests/engine/test_front_ends.py runs them against the real engine."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from openai import OpenAI

from refine_server.config import Settings
from tests.unit.proxy.helpers import _serve

QUESTION = "one two three"


@pytest.fixture(scope="module")
def anthropic_client(proxy: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy, api_key="unused", max_retries=0)


def _named_events(url: str, path: str, body: dict) -> list[bytes]:
    """A stream's raw SSE events, each as the bytes between blank lines."""
    with httpx.stream("POST", url + path, json=body, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        raw = b"".join(resp.iter_bytes())
    return [event for event in raw.split(b"\n\n") if event]


def _data(event: bytes) -> dict:
    return json.loads(event.partition(b"\ndata: ")[2])


# ---- relayed: none -----------------------------------------------------------------------------------------


def test_a_response_is_relayed_with_the_refine_block(client: OpenAI) -> None:
    resp = client.responses.create(model="fake-model", input=QUESTION, extra_body={"refine": {"policy": "none"}})
    assert resp.output_text == "alpha beta gamma"
    assert resp.model_extra["refine"]["policy"] == "none"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "fake-model", "input": QUESTION, "stream": True}),
        (
            "/v1/messages",
            {
                "model": "fake-model",
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": QUESTION}],
            },
        ),
    ],
)
def test_a_relayed_named_stream_is_the_engines_byte_for_byte_but_the_refine_block(
    proxy: str, fake_backend: str, path: str, body: dict
) -> None:
    direct, relayed = _named_events(fake_backend, path, body), _named_events(proxy, path, body)
    assert len(direct) == len(relayed) and relayed[:-1] == direct[:-1]  # the fake's odd space survives
    last = _data(relayed[-1])
    assert last.pop("refine")["policy"] == "none"
    assert relayed[-1].partition(b"\n")[0] == direct[-1].partition(b"\n")[0]  # the event line
    assert last == _data(direct[-1])


def test_a_message_is_relayed_and_streams_through_the_anthropic_sdk(anthropic_client: anthropic.Anthropic) -> None:
    message = anthropic_client.messages.create(
        model="fake-model", max_tokens=8, messages=[{"role": "user", "content": QUESTION}]
    )
    assert message.content[0].text == "alpha beta gamma"
    assert message.model_extra["refine"]["policy"] == "none"
    with anthropic_client.messages.stream(
        model="fake-model", max_tokens=8, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        assert "".join(stream.text_stream) == "alpha beta gamma"
        assert stream.get_final_message().stop_reason == "end_turn"


# ---- translated: a policy that writes its own answer ------------------------------------------------------


def test_a_response_from_a_policy_that_writes_its_own_answer(client: OpenAI) -> None:
    resp = client.responses.create(
        model="fake-model",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        extra_body={"refine": {"policy": "echo"}},
    )
    assert resp.output_text == "three two one" and resp.status == "completed"
    assert resp.usage.output_tokens == 3 and resp.usage.total_tokens == 10
    refine = resp.model_extra["refine"]
    assert refine["trace"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
    ]


def test_a_response_cut_at_max_output_tokens_is_incomplete(client: OpenAI) -> None:
    resp = client.responses.create(
        model="fake-model", input=QUESTION, max_output_tokens=2, extra_body={"refine": {"policy": "echo"}}
    )
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"


def test_a_streamed_response_from_a_policy_that_writes_its_own_answer(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model="fake-model", input=QUESTION, stream=True, extra_body={"refine": {"policy": "echo"}}
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "three two one"
    final = events[-1]
    assert final.response.output_text == "three two one" and final.response.usage.output_tokens == 3
    assert final.model_extra["refine"]["policy"] == "echo"


def test_a_message_from_a_policy_that_writes_its_own_answer(anthropic_client: anthropic.Anthropic) -> None:
    message = anthropic_client.messages.create(
        model="fake-model",
        max_tokens=8,
        system="Be brief.",
        extra_body={"refine": {"policy": "echo"}},
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
    )
    assert message.content[0].text == "three two one" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3 and message.usage.input_tokens == 7
    with anthropic_client.messages.stream(
        model="fake-model",
        max_tokens=2,
        extra_body={"refine": {"policy": "echo"}},
        messages=[{"role": "user", "content": QUESTION}],
    ) as stream:
        assert "".join(stream.text_stream) == "three two one"
        final = stream.get_final_message()
    assert final.content[0].text == "three two one" and final.usage.output_tokens == 3


def test_a_translated_message_stream_ends_with_the_refine_block(proxy: str) -> None:
    events = _named_events(
        proxy,
        "/v1/messages",
        {
            "model": "fake-model",
            "max_tokens": 8,
            "stream": True,
            "refine": {"policy": "echo"},
            "messages": [{"role": "user", "content": QUESTION}],
        },
    )
    names = [e.partition(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert _data(events[-1])["refine"]["policy"] == "echo"


# ---- what a policy cannot honour, and errors in each API's shape --------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": QUESTION, "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"input": QUESTION, "previous_response_id": "resp_1"}, "previous_response_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "{}"}]}, "input[0]"),
    ],
)
def test_the_responses_api_refuses_what_the_policy_cannot_honour_naming_the_field(
    proxy: str, body: dict, param: str
) -> None:
    resp = httpx.post(f"{proxy}/v1/responses", json={"model": "fake-model", "refine": {"policy": "echo"}, **body})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param and resp.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ],
)
def test_the_messages_api_refuses_in_anthropics_error_shape(proxy: str, body: dict, param: str) -> None:
    request = {
        "model": "fake-model",
        "max_tokens": 8,
        "refine": {"policy": "echo"},
        "messages": [{"role": "user", "content": QUESTION}],
        **body,
    }
    resp = httpx.post(f"{proxy}/v1/messages", json=request)
    assert resp.status_code == 400
    error = resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert param in error["error"]["message"]


def test_the_anthropic_sdk_raises_refines_errors_as_its_own(anthropic_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        anthropic_client.messages.create(
            model="fake-model",
            max_tokens=8,
            extra_body={"refine": {"policy": "nosuch"}},
            messages=[{"role": "user", "content": QUESTION}],
        )
    assert "unknown policy" in raised.value.message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "fake-model"}),
        ("/v1/messages", {"model": "fake-model", "messages": [{"role": "user", "content": QUESTION}]}),
        ("/v1/messages", [1, 2]),
    ],
)
def test_malformed_bodies_are_400s_in_each_apis_shape(proxy: str, path: str, body: object) -> None:
    resp = httpx.post(proxy + path, json=body)
    assert resp.status_code == 400
    error = resp.json()
    if path == "/v1/messages":
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    else:
        assert error["error"]["type"] == "invalid_request_error"


def test_anthropic_clients_authenticate_with_x_api_key(fake_backend: str) -> None:
    with _serve(Settings(backend_url=fake_backend, api_keys=["k1"])) as url:
        good = anthropic.Anthropic(base_url=url, api_key="k1", max_retries=0)
        assert (
            good.messages.create(model="fake-model", max_tokens=8, messages=[{"role": "user", "content": QUESTION}])
            .content[0]
            .text
        )
        bad = httpx.post(
            f"{url}/v1/messages",
            headers={"x-api-key": "nope"},
            json={"model": "fake-model", "max_tokens": 8, "messages": []},
        )
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"


def test_the_endpoint_label_of_the_metrics_names_the_api(proxy: str, client: OpenAI) -> None:
    client.responses.create(model="fake-model", input=QUESTION)
    metrics = httpx.get(f"{proxy}/metrics").text
    assert 'refine_requests_total{endpoint="responses",policy="none",status="200"}' in metrics


def test_openapi_documents_both_request_bodies_with_the_per_policy_refine_schemas(proxy: str) -> None:
    schema = httpx.get(f"{proxy}/openapi.json").json()
    for path, operation in (("/v1/responses", "createResponse"), ("/v1/messages", "createMessage")):
        post = schema["paths"][path]["post"]
        assert post["operationId"] == operation
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        refine = schema["components"]["schemas"][ref]["properties"]["refine"]
        assert "echo" in json.dumps(refine) and "steps" in json.dumps(refine)
    error = schema["paths"]["/v1/messages"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("AnthropicErrorResponse")


def test_a_bug_in_a_policy_is_a_500_in_each_apis_shape(proxy: str) -> None:
    messages = httpx.post(
        f"{proxy}/v1/messages",
        json={
            "model": "fake-model",
            "max_tokens": 8,
            "refine": {"policy": "broken"},
            "messages": [{"role": "user", "content": QUESTION}],
        },
    )
    assert messages.status_code == 500 and messages.json()["error"]["type"] == "api_error"
    responses = httpx.post(
        f"{proxy}/v1/responses", json={"model": "fake-model", "input": QUESTION, "refine": {"policy": "broken"}}
    )
    assert responses.status_code == 500 and responses.json()["error"]["code"] == "internal_error"
