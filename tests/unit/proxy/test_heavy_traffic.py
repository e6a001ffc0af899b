"""Heavy policies beside plain traffic, against the fake backend: the default max_tokens, engine priorities,
per-policy concurrency with its bounded queue, per-key budgets. ("steps" stands in for a heavy policy: a relay,
so a "SLOW" prompt holds its slot for 3 s.)"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from refine_server.config import Settings
from tests.conftest import metric_total, start_refine, stop_refine
from tests.fake_vllm import MODEL, free_port
from tests.unit.proxy.helpers import _serve, admission, wait_for

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _last_body(fake_backend: str) -> dict[str, Any]:
    return httpx.get(f"{fake_backend}/fake/bodies").json()[-1]


def _complete(
    url: str, prompt: str = "hi", policy: str = "steps", key: str | None = None, timeout: float = 20, **fields: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "prompt": prompt, "refine": {"policy": policy}, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout)


# ---- the default max_tokens, and engine priorities ---------------------------------------------------------


def test_a_request_without_max_tokens_gets_the_servers_default_on_both_endpoints_and_in_policies(
    fake_backend: str,
) -> None:
    with _serve(Settings(backend_url=fake_backend, default_max_tokens=7, max_tokens_limit=64)) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status_code == 200
        assert _last_body(fake_backend)["max_tokens"] == 7
        assert resp.json()["refine"]["server_defaults"] == {"max_tokens": 7}

        resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200, resp.text
        assert _last_body(fake_backend)["max_completion_tokens"] == 7
        assert resp.json()["refine"]["server_defaults"] == {"max_tokens": 7}

        # The client's own value stays, and nothing is reported as defaulted.
        resp = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert _last_body(fake_backend)["max_tokens"] == 3 and "max_completion_tokens" not in _last_body(fake_backend)
        assert "server_defaults" not in resp.json()["refine"]

        # A policy's own engine call that names no length gets it too.
        resp = _complete(url, policy="drafting", max_tokens=5)
        assert resp.status_code == 200 and _last_body(fake_backend)["max_tokens"] == 7

        # Streaming: the relayed body is bounded as well.
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True}) as r:
            r.read()
        assert _last_body(fake_backend)["max_tokens"] == 7


def test_the_default_is_at_most_the_limit() -> None:
    assert Settings(max_tokens_limit=8).answer_tokens_default() == 8
    with pytest.raises(ValueError, match="exceeds max_tokens_limit"):
        Settings(max_tokens_limit=8, default_max_tokens=9)


def test_plain_requests_go_before_policies_engine_calls_where_the_engine_schedules_by_priority(
    fake_backend: str,
) -> None:
    keys = ["plain-key", {"key": "batch-key", "name": "batch", "policy_priority": {"none": 7}}]
    settings = Settings(
        backend_url=fake_backend, engine_priority_scheduling=True, policy_priority={"drafting": 3}, api_keys=keys
    )
    with _serve(settings) as url:
        assert _complete(url, policy="none", key="plain-key").status_code == 200
        assert _last_body(fake_backend)["priority"] == 0
        assert _complete(url, policy="steps", key="plain-key").status_code == 200
        assert _last_body(fake_backend)["priority"] == 1  # any policy but none, unless configured
        assert _complete(url, policy="drafting", key="plain-key").status_code == 200
        assert _last_body(fake_backend)["priority"] == 3  # the policy's own call, at the server's setting
        assert _complete(url, policy="none", key="batch-key").status_code == 200
        assert _last_body(fake_backend)["priority"] == 7  # the key's own setting wins
        # A client's own priority stays closed unless the operator opens it.
        resp = _complete(url, policy="none", key="plain-key", priority=-5)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "priority"
        policies = httpx.get(f"{url}/v1/refine/policies", headers={"Authorization": "Bearer batch-key"}).json()
        assert {p["name"]: p["admission"]["engine_priority"] for p in policies["data"]}["none"] == 7


def test_no_priority_is_sent_to_an_engine_that_does_not_schedule_by_it(proxy: str, fake_backend: str) -> None:
    assert _complete(proxy, policy="drafting").status_code == 200
    assert "priority" not in _last_body(fake_backend)


# ---- per-policy concurrency ----------------------------------------------------------------------------


def test_a_request_that_cannot_start_in_time_gets_a_429_with_retry_after_and_plain_traffic_goes_on(
    fake_backend: str,
) -> None:
    settings = Settings(backend_url=fake_backend, policy_concurrency={"steps": 1}, policy_queue_timeout=0.5)
    with _serve(settings) as url, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(_complete, url, "SLOW")
        wait_for(lambda: admission(url, "steps")["running"] == 1)
        started = time.monotonic()
        refused = _complete(url)
        assert 0.4 < time.monotonic() - started < 2.5
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "policy_busy"
        assert error["param"] == "refine.policy" and "concurrency limit" in error["message"]
        # Plain requests are not held back by the busy policy.
        assert _complete(url, policy="none").status_code == 200
        assert holder.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_total(metrics, "refine_admission_rejections_total") == 1
        assert 'refine_requests_total{endpoint="completions",policy="steps",status="429"} 1.0' in metrics


def test_a_queued_request_starts_when_the_slot_frees(fake_backend: str) -> None:
    settings = Settings(backend_url=fake_backend, policy_concurrency={"steps": 1}, policy_queue_timeout=10)
    with _serve(settings) as url, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(_complete, url, "SLOW")
        wait_for(lambda: admission(url, "steps")["running"] == 1)
        queued = pool.submit(_complete, url)
        wait_for(lambda: admission(url, "steps")["waiting"] == 1)
        assert admission(url, "steps")["concurrency_limit"] == 1
        assert queued.result().status_code == 200 and holder.result().status_code == 200
        assert admission(url, "steps") == {
            "concurrency_limit": 1,
            "running": 0,
            "waiting": 0,
            "queue_timeout_s": 10.0,
            "engine_priority": None,
        }
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_total(metrics, "refine_admission_wait_seconds_count") == 2
        assert metric_total(metrics, "refine_admission_wait_seconds_sum") > 1.0  # the queued one waited


def test_a_waiting_client_that_disconnects_leaves_the_queue_at_once(fake_backend: str) -> None:
    settings = Settings(backend_url=fake_backend, policy_concurrency={"steps": 1}, policy_queue_timeout=30)
    with _serve(settings) as url, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(_complete, url, "SLOW")
        wait_for(lambda: admission(url, "steps")["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):
            _complete(url, timeout=0.5)  # the client gives up and closes its connection
        wait_for(lambda: admission(url, "steps")["waiting"] == 0, timeout_s=1.0)
        assert not holder.done()  # still within the holder's 3 s: the waiter left, it was not served
        assert holder.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'refine_requests_total{endpoint="completions",policy="steps",status="499"} 1.0' in metrics
        assert metric_total(metrics, "refine_admission_queue_depth") == 0


# ---- per-key budgets -----------------------------------------------------------------------------------


def test_per_key_budgets_for_requests_and_engine_tokens(fake_backend: str) -> None:
    keys = [
        {"key": "secret-small", "name": "small", "requests_per_minute": 2},
        {"key": "secret-tokens", "name": "tokens", "tokens_per_minute": 10},
        {"key": "secret-free"},
        {"key": "secret-big", "name": "big", "tokens_per_minute": 1000},
    ]
    with _serve(Settings(backend_url=fake_backend, api_keys=keys)) as url:
        assert [_complete(url, key="secret-small").status_code for _ in range(2)] == [200, 200]
        refused = _complete(url, key="secret-small")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"]["code"] == "key_budget_exceeded"
        assert _complete(url, key="secret-free").status_code == 200  # other keys are not held back

        # Every engine call counts: 4 tokens a plain completion; a stream's usage is asked for and counted, and
        # not shown to a client that did not ask for it.
        assert _complete(url, key="secret-tokens").status_code == 200
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            headers={"Authorization": "Bearer secret-tokens"},
            json={"model": MODEL, "prompt": "hi", "stream": True},
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert not any('"usage"' in e for e in events) and events[-1] == "data: [DONE]"
        assert _last_body(fake_backend)["stream_options"] == {"include_usage": True}
        assert _complete(url, key="secret-tokens").status_code == 200  # 8 of 10 spent: still admitted
        refused = _complete(url, key="secret-tokens")  # 12 spent
        assert refused.status_code == 429 and "tokens_per_minute" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1

        # A client that asked for the usage chunk still gets it, once.
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            headers={"Authorization": "Bearer secret-big"},
            json={"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert sum('"usage":{' in e for e in events) == 1 and '"choices":[]' in events[-2]

        metrics = httpx.get(f"{url}/metrics").text
        assert 'refine_key_engine_tokens_total{key="tokens"} 12.0' in metrics
        assert 'refine_key_engine_tokens_total{key="big"} 4.0' in metrics
        assert 'refine_key_requests_total{key="small"} 2.0' in metrics
        assert 'refine_key_requests_total{key="key-3"} 1.0' in metrics  # unnamed: its place in the list
        assert 'refine_key_rejections_total{budget="requests_per_minute",key="small"} 1.0' in metrics
        assert "secret-" not in metrics


def test_key_names_must_be_unique() -> None:
    from refine_server.app import create_app

    with pytest.raises(ValueError, match="two keys are named"):
        create_app(
            Settings(
                backend_url=["http://127.0.0.1:9"], api_keys=[{"key": "a", "name": "x"}, {"key": "b", "name": "x"}]
            )
        )


# ---- shutdown --------------------------------------------------------------------------------------------


def test_shutdown_answers_waiting_requests_with_503_at_once_and_finishes_the_running_one(fake_backend: str) -> None:
    """refine as a user runs it (its own process, uvicorn's signal handling): SIGTERM while one request holds
    the only slot of `none` and another waits for it."""
    server = start_refine(
        "wt30-shutdown",
        free_port(),
        "--backend-url",
        fake_backend,
        "--policy-concurrency",
        '{"none": 1}',
        "--policy-queue-timeout",
        "60",
        ready_timeout_s=60,
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            holder = pool.submit(_complete, server.url, "SLOW", "none")
            wait_for(lambda: admission(server.url, "none")["running"] == 1)
            waiter = pool.submit(_complete, server.url, "hi", "none")
            wait_for(lambda: admission(server.url, "none")["waiting"] == 1)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answer = waiter.result()
            assert time.monotonic() - signalled < 1.5  # not after the holder's 3 s, nor the 60 s timeout
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
            assert holder.result().status_code == 200  # what was running is finished, not cut off
    finally:
        stop_refine(server)


# ---- plain traffic first -----------------------------------------------------------------------------------


def test_a_policys_engine_call_waits_for_running_plain_requests_at_most_plain_first_wait_s(
    fake_backend: str,
) -> None:
    settings = Settings(backend_url=fake_backend, plain_first_wait_s=2.0)
    with _serve(settings) as url, ThreadPoolExecutor(2) as pool:
        # Nothing plain in flight: the policy's call goes at once.
        started = time.monotonic()
        assert _complete(url, policy="drafting").status_code == 200
        assert time.monotonic() - started < 1.5

        # A plain request that runs 3 s: the policy's call waits 2 s for it, then goes anyway.
        plain = pool.submit(_complete, url, "SLOW", "none")
        wait_for(lambda: len(httpx.get(f"{fake_backend}/fake/bodies").json()) >= 2)  # the plain one arrived
        started = time.monotonic()
        assert _complete(url, policy="drafting").status_code == 200
        assert 1.9 <= time.monotonic() - started < 4
        assert plain.result().status_code == 200

        # Plain requests themselves never wait.
        assert _seconds_beside_a_slow_plain_request(url, pool, "none") < 1.5

        waited = metric_total(httpx.get(f"{url}/metrics").text, "refine_plain_first_wait_seconds_sum")
        assert 1.9 <= waited < 3.2  # only the one wait, recorded once the request ended


def test_without_plain_first_wait_s_a_policys_call_does_not_wait(fake_backend: str) -> None:
    with _serve(Settings(backend_url=fake_backend)) as url, ThreadPoolExecutor(1) as pool:
        assert _seconds_beside_a_slow_plain_request(url, pool, "drafting") < 1.5


def _seconds_beside_a_slow_plain_request(url: str, pool: ThreadPoolExecutor, policy: str) -> float:
    """How long a `policy` request took while a plain request of 3 s was in flight (both answered)."""
    plain = pool.submit(_complete, url, "SLOW", "none")
    time.sleep(0.3)
    started = time.monotonic()
    assert _complete(url, policy=policy).status_code == 200
    took = time.monotonic() - started
    assert plain.result().status_code == 200
    return took
