"""The side door against a fake backend (no engine): engine-facing fields a client may not set, and the ones the
operator may open."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from tests.fake_vllm import MODEL
from tests.unit.proxy.helpers import _serve


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"vllm_xargs": {"refine_policy": "srgen", "refine_params": '{"steps": 100}'}}, "vllm_xargs.refine_policy"),
        ({"vllm_xargs": {"refine_anything": 1}}, "vllm_xargs.refine_anything"),
        ({"vllm_xargs": {"some_plugin_knob": 1}}, "vllm_xargs.some_plugin_knob"),
        ({"priority": -10}, "priority"),
        ({"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
    ],
)
def test_engine_internal_fields_are_refused_naming_the_field(client: OpenAI, extra: dict, param: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", stream=stream, extra_body=extra)
        assert err.value.body["param"] == param


def test_the_operator_can_open_resource_fields_but_never_refines_own(fake_backend: str) -> None:
    settings = Settings(backend_url=fake_backend, client_engine_fields=["priority", "vllm_xargs.some_plugin_knob"])
    with _serve(settings) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        resp = client.completions.create(
            model=MODEL, prompt="hi", extra_body={"priority": 1, "vllm_xargs": {"some_plugin_knob": 2}}
        )
        assert resp.choices[0].text == "alpha beta gamma"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"vllm_xargs": {"refine_policy": "x"}})
    with pytest.raises(ValueError, match="cannot be opened"):
        create_app(Settings(backend_url=fake_backend, client_engine_fields=["vllm_xargs.refine_policy"]))
    with pytest.raises(ValueError, match="unknown entry"):
        create_app(Settings(backend_url=fake_backend, client_engine_fields=["temperature"]))
