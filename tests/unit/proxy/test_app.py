"""Route-level mechanics against a fake backend (no engine): the refine block, policies' parameters, limits and
metrics, a failing policy, start-up checks."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.none import NonePolicy
from tests.conftest import metric_total
from tests.fake_vllm import MODEL


def test_refine_block_reports_policy_and_effective_params(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body={"refine": {"policy": "steps"}})
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
        failed = r'^refine_requests_total\{[^}]*policy="broken"[^}]*status="500"\} (\S+)$'
        return sum(float(v) for v in re.findall(failed, text, re.M))

    before = failures()
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "broken"}})
    assert err.value.body["type"] == "server_error" and "a bug" not in str(err.value.body)
    assert failures() == before + 1


def test_parameter_over_the_server_limit_is_a_400_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 9}})
    assert err.value.body["param"] == "refine.max_steps"
    assert "limit of 5" in err.value.body["message"]


def test_wrongly_typed_policy_parameter_is_a_400_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": "x"}}
        )
    assert err.value.body["param"] == "refine.max_steps"


def test_limits_for_an_unknown_policy_fail_at_start_up() -> None:
    with pytest.raises(ValueError, match="unknown policies"):
        PolicyRegistry([NonePolicy], {"nosuch": {"x": 1}})


def test_unknown_default_policy_fails_at_start_up() -> None:
    with pytest.raises(KeyError):
        create_app(Settings(backend_url="http://127.0.0.1:9", default_policy="nosuch"))
