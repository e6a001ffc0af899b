"""The fields refine sets on a request's engine calls where the call does not, and the answer length a policy
reads from a request whose max_tokens is the server's default."""

from __future__ import annotations

from dataclasses import replace

from refine_server.gatekeeping.max_tokens import server_defaults, with_default_max_tokens
from refine_server.policies.call_fields import CallFields
from refine_server.policies.rain.policy import DEFAULT_MAX_TOKENS, read_request
from refine_server.policies.request import ClientRequest


def _request(endpoint: str = "chat", max_tokens: int | None = None) -> ClientRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        model="m",
        n=1,
        max_tokens=max_tokens,
        seed=None,
        stop=[],
        stream=False,
        include_usage=False,
        messages=body["messages"],
        prompt=None,
    )


def test_fill_adds_only_what_a_call_leaves_out() -> None:
    fields = CallFields(max_tokens=64, priority=1)
    assert fields.fill({"prompt": "x"}) == {"prompt": "x", "max_tokens": 64, "priority": 1}
    # A length under either name, or a priority the client was allowed to send, stays as it is.
    assert fields.fill({"max_completion_tokens": 5}) == {"max_completion_tokens": 5, "priority": 1}
    assert fields.fill({"max_tokens": 5, "priority": -3}) == {"max_tokens": 5, "priority": -3}
    # Nothing to add: the same body, not a copy (a relay's body is not copied per request for nothing).
    body = {"max_tokens": 5}
    assert CallFields(max_tokens=64).fill(body) is body
    assert CallFields().fill({"prompt": "x"}) == {"prompt": "x"}


def test_a_request_without_a_length_gets_the_default_in_its_body_and_its_typed_fields() -> None:
    chat = with_default_max_tokens(_request(), 100)
    assert chat.max_tokens == 100 and chat.max_tokens_defaulted and chat.body["max_completion_tokens"] == 100
    assert server_defaults(chat) == {"server_defaults": {"max_tokens": 100}}
    completion = with_default_max_tokens(replace(_request(), endpoint="completions"), 100)
    assert completion.body["max_tokens"] == 100
    own = _request(max_tokens=7)
    assert with_default_max_tokens(own, 100) is own and server_defaults(own) == {}


def test_rain_keeps_its_shorter_default_within_the_servers_and_the_clients_own_length() -> None:
    assert read_request(with_default_max_tokens(_request(), 1024)).max_tokens == DEFAULT_MAX_TOKENS
    assert read_request(with_default_max_tokens(_request(), 8)).max_tokens == 8
    assert read_request(_request(max_tokens=1000)).max_tokens == 1000
