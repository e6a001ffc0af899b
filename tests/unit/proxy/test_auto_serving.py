"""auto through the server, in front of tests/fake_vllm.py (no plugin, no logprobs): the escalation is
resolved as a request's own policy is (validation, caps, an API key's permissions and caps, the plugin,
refused fields), each error a 400 naming the field under `refine.escalate`; the decision's header and metric."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.auto import AutoPolicy
from refine_server.policies.cyberv import CyberVPolicy
from refine_server.policies.none import NonePolicy
from refine_server.policies.srgen import SRGenPolicy
from tests.conftest import MODEL, metric_total
from tests.fake_vllm import serve_in_thread
from tests.unit.proxy.helpers import admission, wait_for

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def auto_proxy(fake_backend: str) -> Iterator[str]:
    settings = Settings(
        backend_url=fake_backend,
        policy_limits={"cyberv": {"n": 6}},
        api_keys=[
            "open",
            {"key": "plain-only", "policies": ["auto", "none"]},
            {"key": "small", "policy_limits": {"cyberv": {"n": 3}}},
        ],
    )
    registry = PolicyRegistry([NonePolicy, SRGenPolicy, CyberVPolicy, AutoPolicy], settings.policy_limits)
    with serve_in_thread(create_app(settings, registry)) as url:
        yield url


def _client(proxy: str, key: str = "open") -> OpenAI:
    return OpenAI(base_url=f"{proxy}/v1", api_key=key, max_retries=0)


def _refused(proxy: str, refine: dict, key: str = "open", **body: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as refused:
        _client(proxy, key).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=8, extra_body={"refine": refine}, **body
        )
    return refused.value


@pytest.mark.parametrize(
    ("refine", "param"),
    [
        ({"policy": "auto", "escalate": {"policy": "auto"}}, "refine.escalate.policy"),
        ({"policy": "auto", "escalate": {"policy": "none"}}, "refine.escalate.policy"),
        ({"policy": "auto", "escalate": {"policy": "deepconf"}}, "refine.escalate.policy"),  # not registered here
        ({"policy": "auto", "escalate": {"policy": "rain"}}, "refine.escalate.policy"),  # nor this
        ({"policy": "auto", "escalate": {"policy": "cyberv", "n": 1}}, "refine.escalate.n"),  # its own validation
        ({"policy": "auto", "escalate": {"policy": "cyberv", "typo": 1}}, "refine.escalate.typo"),
        ({"policy": "auto", "escalate": {"policy": "cyberv", "n": 7}}, "refine.escalate.n"),  # the server's cap
        ({"policy": "auto", "signal": "vibes"}, "refine.signal"),
        ({"policy": "auto", "threshold": "high"}, "refine.threshold"),
    ],
)
def test_bad_escalations_are_400s_naming_the_field(auto_proxy: str, refine: dict, param: str) -> None:
    error = _refused(auto_proxy, refine)
    assert error.status_code == 400 and error.body["param"] == param, error.body


def test_the_keys_permissions_and_caps_apply_to_the_escalation(auto_proxy: str) -> None:
    error = _refused(auto_proxy, {"policy": "auto", "escalate": {"policy": "cyberv"}}, key="plain-only")
    assert error.status_code == 403
    error = _refused(auto_proxy, {"policy": "auto", "escalate": {"policy": "cyberv", "n": 4}}, key="small")
    assert error.status_code == 400 and error.body["param"] == "refine.escalate.n"


def test_the_escalations_plugin_and_refused_fields_are_checked_before_any_work(auto_proxy: str) -> None:
    error = _refused(auto_proxy, {"policy": "auto", "escalate": {"policy": "srgen"}})
    assert error.status_code == 400 and error.body["param"] == "refine.escalate.policy"
    assert error.body["code"] == "engine_plugin_missing"
    error = _refused(
        auto_proxy,
        {"policy": "auto", "escalate": {"policy": "cyberv", "n": 2}},
        response_format={"type": "json_object"},
    )
    assert error.status_code == 400 and error.body["param"] == "response_format"  # cyberv cannot honour it


def test_the_decision_goes_out_as_a_header_and_a_labelled_metric(auto_proxy: str) -> None:
    # The fake backend sends no logprobs: nothing can be measured, so auto escalates (NaN is never sure).
    raw = _client(auto_proxy).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        extra_body={"refine": {"policy": "auto", "escalate": {"policy": "cyberv", "n": 2}}},
    )
    assert raw.headers["x-refine-escalated"] == "true" and raw.headers["x-refine-policy"] == "auto"
    trace = raw.parse().model_extra["refine"]["trace"]
    assert trace["escalated"] is True and trace["value"] is None and trace["escalation"]["direct_answer"] == "given"
    metrics = httpx.get(f"{auto_proxy}/metrics", headers={"Authorization": "Bearer open"}).text
    labels = 'escalated="true",escalation="cyberv",policy="auto",signal="lowest_group_confidence"'
    sample = f"refine_auto_decisions_total{{{labels}}}"
    assert sample in metrics
    assert metric_total(metrics, "refine_auto_decisions_total") >= 1


def _auto_to_cyberv(proxy: str) -> object:
    return _client(proxy).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        extra_body={"refine": {"policy": "auto", "escalate": {"policy": "cyberv", "n": 2}}},
    )


@pytest.mark.parametrize("queue_timeout", [0.5, 10.0])
def test_an_escalation_waits_for_a_slot_of_its_policy_and_without_one_keeps_the_first_answer(
    fake_backend: str, queue_timeout: float
) -> None:
    """cyberv's concurrency limit bounds auto's escalations to cyberv too; one that gets no slot in time answers
    with its first answer (busy), one that gets it runs under cyberv's engine priority."""
    settings = Settings(
        backend_url=fake_backend,
        policy_concurrency={"cyberv": 1},
        policy_queue_timeout=queue_timeout,
        engine_priority_scheduling=True,
        policy_priority={"auto": 2, "cyberv": 3},
    )
    registry = PolicyRegistry([NonePolicy, CyberVPolicy, AutoPolicy], settings.policy_limits)
    with serve_in_thread(create_app(settings, registry)) as url, ThreadPoolExecutor(1) as pool:
        holder = pool.submit(
            _client(url).chat.completions.create,
            model=MODEL,
            messages=[{"role": "user", "content": "SLOW: what is 3 + 3?"}],  # each engine call takes 3 s
            max_tokens=8,
            extra_body={"refine": {"policy": "cyberv", "n": 2}},
        )
        wait_for(lambda: admission(url, "cyberv")["running"] == 1, timeout_s=5)
        sent_before = len(httpx.get(f"{fake_backend}/fake/bodies").json())
        started = time.monotonic()
        raw = _auto_to_cyberv(url)
        waited = time.monotonic() - started
        trace = raw.parse().model_extra["refine"]["trace"]
        bodies = httpx.get(f"{fake_backend}/fake/bodies").json()[sent_before:]
        auto_bodies = [b for b in bodies if "SLOW" not in json.dumps(b)]
        if queue_timeout < 1:
            assert raw.headers["x-refine-escalated"] == "busy" and 0.4 < waited < 2.5
            assert trace["escalated"] is False and trace["escalation_busy"] is True and trace["escalation"] is None
            assert [b["priority"] for b in auto_bodies] == [2]  # the first call only, at auto's priority
        else:
            assert raw.headers["x-refine-escalated"] == "true" and waited > 1  # it waited for the holder
            assert trace["escalated"] is True and trace["escalation_busy"] is False
            priorities = [b["priority"] for b in auto_bodies]
            assert priorities[0] == 2 and len(priorities) > 1 and set(priorities[1:]) == {3}
        holder.result()
        metrics = httpx.get(f"{url}/metrics").text
        decided = "busy" if queue_timeout < 1 else "true"
        assert f'escalated="{decided}",escalation="cyberv"' in metrics
        assert admission(url, "cyberv")["running"] == 0  # the escalation's slot was released
