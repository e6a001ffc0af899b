"""Several backends behind one refine: routing, affinity, failover and recovery, through the openai client."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from refine_server import upstreams
from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.base import PolicyCall, PolicyParams
from refine_server.policies.none import NonePolicy
from tests.fake_vllm import MODEL, free_port, make_app, serve_in_thread
from tests.unit.proxy.helpers import wait_for


class ThreeCallsPolicy(NonePolicy):
    """Calls the engine three times for one request, as CyberV and RAIN do."""

    name = "three_calls"

    async def complete(self, call: PolicyCall, params: PolicyParams) -> dict[str, Any]:
        for step in range(3):
            result = await call.engine.completions("step", f"step {step}", max_tokens=3)
        return result


def _refine(backends: list[str]):
    registry = PolicyRegistry([NonePolicy, ThreeCallsPolicy])
    return serve_in_thread(create_app(Settings(backend_url=backends), registry))


def _served(backend: str) -> int:
    return httpx.get(f"{backend}/fake/stats").json()["completions"]


def _metric(refine: str, name: str, backend: str) -> float:
    text = httpx.get(f"{refine}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'upstream="{backend}"' in line
    )


def test_requests_spread_over_the_backends_and_keep_all_their_calls_on_one() -> None:
    with serve_in_thread(make_app()) as a, serve_in_thread(make_app()) as b, _refine([a, b]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(6):
            client.completions.create(model=MODEL, prompt="hi")
        assert _served(a) == _served(b) == 3  # one at a time: equally loaded, taken in turn

        for _ in range(4):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "three_calls"}})
        on_a, on_b = _served(a) - 3, _served(b) - 3
        assert on_a + on_b == 12 and on_a and on_b
        assert on_a % 3 == on_b % 3 == 0  # every request's three calls on the same backend
        assert _metric(url, "refine_upstream_routed_requests_total", a) == 5


def test_a_backend_that_goes_away_is_taken_out_and_no_request_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # No probe runs during the test: the requests themselves find b gone (with probes, one could notice first
    # and the failover path would not be taken).
    monkeypatch.setattr(upstreams, "PROBE_INTERVAL_S", 3600)
    port = free_port()
    with serve_in_thread(make_app()) as a:
        b_server = serve_in_thread(make_app(), port)
        b = b_server.__enter__()
        with _refine([a, b]) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            b_server.__exit__(None, None, None)
            # No request is lost: one that finds b gone before anything was sent moves to a.
            for stream in (False, True, False, True):
                resp = client.completions.create(model=MODEL, prompt="hi", stream=stream)
                text = "".join(c.choices[0].text for c in resp if c.choices) if stream else resp.choices[0].text
                assert text == "alpha beta gamma"
            assert _metric(url, "refine_upstream_failovers_total", b) == 1  # then b is out: no second try
            assert _metric(url, "refine_upstream_healthy", b) == 0


def test_a_backend_that_comes_back_is_probed_back_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstreams, "PROBE_INTERVAL_S", 0.2)
    port = free_port()
    b = f"http://127.0.0.1:{port}"
    with serve_in_thread(make_app()) as a, _refine([a, b]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        wait_for(lambda: _metric(url, "refine_upstream_healthy", b) == 0, timeout_s=60)  # the probe finds nothing at b
        with serve_in_thread(make_app(), port) as b_again:
            wait_for(lambda: _metric(url, "refine_upstream_healthy", b) == 1, timeout_s=60)
            for _ in range(4):
                client.completions.create(model=MODEL, prompt="hi")
            assert _served(b_again) == 2


def test_when_every_backend_is_down_the_client_gets_a_503() -> None:
    with _refine([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "backend_unavailable"


def test_a_stream_whose_backend_fails_after_accepting_it_moves_to_another_unseen_by_the_client() -> None:
    """refine answers a relayed stream's headers when the engine accepts it (its 200), before the first token;
    a backend that fails after that but before its first event is replaced, as if it had refused outright."""
    with (
        serve_in_thread(make_app(drops_streams=True)) as failing,
        serve_in_thread(make_app()) as working,
        _refine([failing, working]) as url,
    ):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(2):  # ties are taken in turn: one of the two starts on the failing backend
            stream = client.completions.create(model=MODEL, prompt="hi", stream=True)
            assert "".join(c.choices[0].text for c in stream if c.choices) == "alpha beta gamma"
        assert (_served(failing), _served(working)) == (1, 2)


def test_with_one_backend_a_stream_it_drops_before_its_first_event_ends_with_an_error_event() -> None:
    with serve_in_thread(make_app(drops_streams=True)) as failing, _refine([failing]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt="hi", stream=True)  # the 200 came
        with pytest.raises(openai.APIError, match="backend unavailable"):
            list(stream)


def test_a_backend_killed_under_load_ends_its_streams_with_an_error_and_loses_no_new_request() -> None:
    port = free_port()
    killed = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=killed.run, daemon=True)
    thread.start()
    while not killed.started:
        time.sleep(0.02)
    b = f"http://127.0.0.1:{port}"
    with serve_in_thread(make_app()) as a, _refine([a, b]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        streams = [client.completions.create(model=MODEL, prompt="LONG_STREAM", stream=True) for _ in range(4)]
        for stream in streams:
            next(iter(stream))  # every stream under way: two on each backend
        killed.force_exit = killed.should_exit = True  # b dies without finishing what it was sending
        thread.join(10)

        outcomes = []
        for stream in streams:
            try:
                outcomes.append(len([c for c in stream if c.choices]))
            except openai.APIError as exc:
                outcomes.append(str(exc))
        finished = [o for o in outcomes if o == 49]  # the first chunk was read above
        failed = [o for o in outcomes if isinstance(o, str)]
        assert len(finished) == 2 and len(failed) == 2 and all("backend unavailable" in f for f in failed)
        # Nothing new is lost: requests that would have gone to b move to a.
        for _ in range(4):
            assert client.completions.create(model=MODEL, prompt="hi").choices[0].text == "alpha beta gamma"
