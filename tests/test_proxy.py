"""Proxy mechanics against a fake backend (no engine): auth, error mapping, policies, plugin handshake."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.base import CORRECTIONS, PolicyCall, PolicyLimits, PolicyMetric, PolicyParams
from refine_server.policies.srgen import _fill_trace
from refine_server.policies.none import NonePolicy
from tests.conftest import metric_total, policy_call
from tests.fake_vllm import MODEL, app as fake_vllm_app, free_port, serve_in_thread


class StepsParams(PolicyParams):
    max_steps: int = 3


class StepsLimits(PolicyLimits):
    max_steps: int | None = 5


class StepsPolicy(NonePolicy):
    """A pass-through with a bounded parameter: checks validation and limits without any real algorithm."""

    name = "steps"
    Params = StepsParams
    Limits = StepsLimits


class InEnginePolicy(NonePolicy):
    name = "in_engine"
    needs_engine_plugin = True


class WidgetPolicy(NonePolicy):
    """A policy with a metric of its own: declared, recorded in the trace, and the server does the rest."""

    name = "widgets"
    WIDGETS = PolicyMetric("refine_test_widgets", "Widgets made per request", "counter")
    metrics = (*NonePolicy.metrics, WIDGETS)

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        call.trace.record(self.WIDGETS, 3)
        return await super().complete(call, params)


class BrokenPolicy(NonePolicy):
    """A policy with a bug."""

    name = "broken"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        raise RuntimeError("a bug in a policy")


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[str]:
    with serve_in_thread(fake_vllm_app) as url:
        yield url


def _serve(settings: Settings):
    registry = PolicyRegistry([NonePolicy, StepsPolicy, InEnginePolicy, WidgetPolicy, BrokenPolicy],
                              settings.policy_limits)
    return serve_in_thread(create_app(settings, registry))


@pytest.fixture(scope="module")
def proxy(fake_backend: str) -> Iterator[str]:
    with _serve(Settings(backend_url=fake_backend)) as url:
        yield url


@pytest.fixture(scope="module")
def client(proxy: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)


def test_refine_block_reports_policy_and_effective_params(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps"}})
    assert resp.choices[0].text == "alpha beta gamma"
    assert resp.model_extra["refine"] == {"policy": "steps", "params": {"max_steps": 3}, "trace": {}}


def test_stream_carries_refine_block_on_the_finishing_chunk(client: OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "alpha beta gamma"
    assert [c.model_extra.get("refine") is not None for c in chunks] == [False, False, True]
    assert chunks[-1].model_extra["refine"]["policy"] == "none"


def test_a_policy_declares_its_own_metric_and_the_server_serves_it(client: OpenAI, proxy: str) -> None:
    def widgets() -> float:
        return metric_total(httpx.get(f"{proxy}/metrics").text, "refine_test_widgets_total")

    before = widgets()
    client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "widgets"}})
    assert widgets() == before + 3


def test_a_batch_of_prompts_streams_one_refine_block_and_counts_once(client: OpenAI, proxy: str) -> None:
    """Completions take a list of prompts: n choices for each. The block goes on the last finish only."""
    def observed() -> float:
        return metric_total(httpx.get(f"{proxy}/metrics").text, "refine_correction_seconds_count")

    before = observed()
    chunks = list(client.completions.create(model=MODEL, prompt=["a", "b", "c"], stream=True))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 3
    assert [c.model_extra.get("refine") is not None for c in chunks].count(True) == 1
    assert chunks[-1].model_extra["refine"]["policy"] == "none"
    assert observed() == before + 1


def test_a_failing_policy_is_an_openai_500_and_is_counted(client: OpenAI, proxy: str) -> None:
    def failures() -> float:
        text = httpx.get(f"{proxy}/metrics").text
        return sum(float(v) for v in re.findall(r'^refine_requests_total\{[^}]*policy="broken"[^}]*status="500"\} (\S+)$',
                                                text, re.M))

    before = failures()
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "broken"}})
    assert err.value.body["type"] == "server_error" and "a bug" not in str(err.value.body)
    assert failures() == before + 1


def test_a_backend_without_the_plugin_is_asked_once_not_per_request(client: OpenAI, fake_backend: str) -> None:
    def handshakes() -> int:
        return httpx.get(f"{fake_backend}/fake/stats").json()["refine_xargs_requests"]

    before = handshakes()
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
    assert handshakes() - before <= 1


def test_parameter_over_the_server_limit_is_a_400_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 9}})
    assert err.value.body["param"] == "refine.max_steps"
    assert "limit of 5" in err.value.body["message"]


def test_wrongly_typed_policy_parameter_is_a_400_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": "x"}})
    assert err.value.body["param"] == "refine.max_steps"


def test_in_engine_policy_on_a_backend_without_the_plugin_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
    assert err.value.code == "engine_plugin_missing"
    assert "engine plugin" in err.value.body["message"]


def test_backend_500_becomes_a_502_with_openai_error(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="FAIL_500")
    assert err.value.status_code == 502
    assert "engine exploded" in err.value.body["message"]


def test_error_in_the_middle_of_a_stream_reaches_the_client(client: OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="FAIL_MIDSTREAM", stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(stream)


def test_limits_for_an_unknown_policy_fail_at_start_up() -> None:
    with pytest.raises(ValueError, match="unknown policies"):
        PolicyRegistry([NonePolicy], {"nosuch": {"x": 1}})


def test_unknown_default_policy_fails_at_start_up() -> None:
    with pytest.raises(KeyError):
        create_app(Settings(backend_url="http://127.0.0.1:9", default_policy="nosuch"))


def test_api_keys_are_required_when_configured(fake_backend: str) -> None:
    with _serve(Settings(backend_url=fake_backend, api_keys=["k1", "k2"])) as url:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = OpenAI(base_url=f"{url}/v1", api_key="k2", max_retries=0)
        assert [m.id for m in ok.models.list()] == [MODEL]
        # Liveness and metrics stay open for probes and scrapers.
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_srgen_trace_says_when_the_engine_could_not_report(tmp_path) -> None:
    call = policy_call("completions", {"model": MODEL, "prompt": "x"}, backend=None)
    _fill_trace(call, tmp_path, "d" * 32)
    assert call.trace.data["engine_events"].startswith("unavailable")
    assert call.trace.data["corrections"] is None and CORRECTIONS.name not in call.trace.values


# ---- the side door: engine-facing fields ------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "param"), [
    ({"vllm_xargs": {"refine_policy": "srgen", "refine_params": '{"steps": 100}'}}, "vllm_xargs.refine_policy"),
    ({"vllm_xargs": {"refine_anything": 1}}, "vllm_xargs.refine_anything"),
    ({"vllm_xargs": {"some_plugin_knob": 1}}, "vllm_xargs.some_plugin_knob"),
    ({"priority": -10}, "priority"),
    ({"kv_transfer_params": {"do_remote_prefill": True}}, "kv_transfer_params"),
])
def test_engine_internal_fields_are_refused_naming_the_field(client: OpenAI, extra: dict, param: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", stream=stream, extra_body=extra)
        assert err.value.body["param"] == param


def test_the_operator_can_open_resource_fields_but_never_refines_own(fake_backend: str) -> None:
    settings = Settings(backend_url=fake_backend, client_engine_fields=["priority", "vllm_xargs.some_plugin_knob"])
    with _serve(settings) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        resp = client.completions.create(model=MODEL, prompt="hi",
                                         extra_body={"priority": 1, "vllm_xargs": {"some_plugin_knob": 2}})
        assert resp.choices[0].text == "alpha beta gamma"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"vllm_xargs": {"refine_policy": "x"}})
    with pytest.raises(ValueError, match="cannot be opened"):
        create_app(Settings(backend_url=fake_backend, client_engine_fields=["vllm_xargs.refine_policy"]))
    with pytest.raises(ValueError, match="unknown entry"):
        create_app(Settings(backend_url=fake_backend, client_engine_fields=["temperature"]))


# ---- per-key rules -----------------------------------------------------------------------------------------

def test_api_keys_limit_policies_and_caps_per_key(fake_backend: str) -> None:
    keys = ["admin-key", {"key": "basic-key", "policies": ["none", "steps"],
                          "policy_limits": {"steps": {"max_steps": 2}}}]
    with _serve(Settings(backend_url=fake_backend, api_keys=keys)) as url:
        basic = OpenAI(base_url=f"{url}/v1", api_key="basic-key", max_retries=0)
        admin = OpenAI(base_url=f"{url}/v1", api_key="admin-key", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as err:
            basic.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
        assert err.value.body["param"] == "refine.policy" and "in_engine" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            basic.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 3}})
        assert "limit of 2" in err.value.body["message"]
        basic.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 2}})
        # The other key keeps the server's own caps.
        admin.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 5}})
    with pytest.raises(KeyError):
        create_app(Settings(backend_url=fake_backend, api_keys=[{"key": "k", "policies": ["nosuch"]}]))


def test_backend_down_gives_503_and_not_ready() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with _serve(Settings(backend_url=dead)) as url:
        assert httpx.get(f"{url}/ready").status_code == 503
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "backend_unavailable"
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True}, timeout=30)
        assert resp.status_code == 503
