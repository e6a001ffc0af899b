"""How a client finds the API without the README: /openapi.json's request bodies (OpenAI's fields plus `refine`,
one schema per policy) and GET /v1/refine/policies; errors stay OpenAI's 400s, never FastAPI's 422."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

from refine_server.app import create_app
from refine_server.config import Settings
from tests.fake_vllm import MODEL

HELPER_POLICIES = {"none", "steps", "in_engine", "widgets", "counting", "broken", "picky", "echo", "drafting"}


def _openapi(proxy: str) -> dict[str, Any]:
    return httpx.get(f"{proxy}/openapi.json").json()


def _validator(doc: dict[str, Any], component: str) -> jsonschema.Draft202012Validator:
    """A validator for one component schema, its references resolved within the document."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    )


@pytest.mark.parametrize(
    "path, component", [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")]
)
def test_openapi_documents_each_generation_body_with_every_policys_schema(
    proxy: str, path: str, component: str
) -> None:
    doc = _openapi(proxy)
    body = doc["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{component}"}
    refine = doc["components"]["schemas"][component]["properties"]["refine"]
    union = next(option for option in refine["anyOf"] if "oneOf" in option)
    assert union["discriminator"]["propertyName"] == "policy"
    assert set(union["discriminator"]["mapping"]) == HELPER_POLICIES
    steps = doc["components"]["schemas"]["Refine_steps"]
    assert steps["properties"]["max_steps"]["default"] == 3
    assert steps["properties"]["policy"]["const"] == "steps"
    assert steps["additionalProperties"] is False


def test_the_documented_schema_accepts_what_refine_accepts_and_rejects_what_it_refuses(proxy: str) -> None:
    chat = _validator(_openapi(proxy), "ChatCompletionRequest")
    good = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "vllm_field": 1,  # vLLM's own fields pass through
        "refine": {"policy": "steps", "max_steps": 4},
    }
    chat.validate(good)
    for bad in (
        {**good, "refine": {"policy": "steps", "max_step": 4}},  # a typo in a parameter
        {**good, "refine": {"policy": "nosuch"}},
        {**good, "n": "2"},
        {**good, "messages": []},
    ):
        assert not chat.is_valid(bad), bad


def test_openapi_documents_exactly_the_served_operations(proxy: str) -> None:
    """The generation endpoints are plain Starlette routes whose operations discovery.py writes by hand: each
    documented operation must be served, each served route documented, once, under OpenAI's operation ids."""
    doc = _openapi(proxy)
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    app = create_app(Settings(backend_url=["http://127.0.0.1:9"]))
    served = {
        (route.path, method)
        for route in app.routes
        if getattr(route, "include_in_schema", False)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert documented == served
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert doc["paths"]["/v1/chat/completions"]["post"]["operationId"] == "createChatCompletion"
    assert doc["paths"]["/v1/completions"]["post"]["operationId"] == "createCompletion"

    wrong_method = httpx.get(f"{proxy}/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_openapi_has_no_fastapi_validation_error(proxy: str) -> None:
    text = json.dumps(_openapi(proxy))
    assert '"422"' not in text and "HTTPValidationError" not in text


def test_documented_errors_are_openai_errors_and_a_schema_violation_is_a_400(proxy: str) -> None:
    doc = _openapi(proxy)
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "x-refine-policy" in responses["200"]["headers"]

    resp = httpx.post(f"{proxy}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "messages" and resp.json()["error"]["type"] == "invalid_request_error"
    _validator(doc, "ErrorResponse").validate(resp.json())


def test_policies_lists_parameters_defaults_caps_and_refused_fields(proxy: str) -> None:
    listing = httpx.get(f"{proxy}/v1/refine/policies").json()
    assert listing["object"] == "list" and listing["default_policy"] == "none"
    by_name = {p["name"]: p for p in listing["data"]}
    assert set(by_name) == HELPER_POLICIES
    steps = by_name["steps"]
    assert steps["defaults"] == {"max_steps": 3}
    assert steps["limits"] == {"max_steps": 5}
    assert steps["params_schema"]["properties"]["max_steps"]["type"] == "integer"
    assert steps["description"].startswith("A pass-through with a bounded parameter")
    assert by_name["in_engine"]["runs_in_engine"] is True
    assert by_name["widgets"]["metrics"] == ["refine_correction_seconds", "refine_test_widgets"]


def test_policies_shows_a_keys_own_policies_and_tightened_caps() -> None:
    key = {"key": "k1", "policies": ["cyberv", "srgen"], "policy_limits": {"cyberv": {"n": 4}}}
    app = create_app(Settings(backend_url=["http://127.0.0.1:9"], api_keys=[key], policy_limits={"cyberv": {"n": 6}}))
    with TestClient(app) as http:
        assert http.get("/v1/refine/policies").status_code == 401
        listing = http.get("/v1/refine/policies", headers={"Authorization": "Bearer k1"}).json()
    by_name = {p["name"]: p for p in listing["data"]}
    assert set(by_name) == {"cyberv", "srgen"}
    # The key's cap tightens the server's; the caps the server configured nothing for keep their defaults.
    assert by_name["cyberv"]["limits"] == {
        "n": 4,
        "max_reasoning_tokens": 2048,
        "max_feedback_tokens": 2048,
        "confidence_window": 4096,
    }
    assert by_name["cyberv"]["defaults"]["n"] == 8
    assert by_name["cyberv"]["refuses_fields"] == [
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "echo",
    ]
    assert by_name["srgen"]["runs_in_engine"] is True and by_name["srgen"]["refuses_fields"] == []
    assert by_name["srgen"]["limits"]["max_corrections"] == 64
