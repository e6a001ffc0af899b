"""What refine does around the real engine: metrics, cancellation, external mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from tests.conftest import ENGINE_ENV, MODEL, metric_total, start_refine, stop_refine
from tests.fake_vllm import free_port, make_app, serve_in_thread

pytestmark = pytest.mark.engine


def test_metrics_carry_refine_histograms_by_policy_next_to_vllm(client: OpenAI, refine_server) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        extra_body={"refine": {"policy": "none"}},
    ).close()
    list(client.completions.create(model=MODEL, prompt="a b c", max_tokens=4, stream=True))
    text = httpx.get(f"{refine_server.url}/metrics").text
    for family in (
        "refine_request_duration_seconds",
        "refine_time_to_first_token_seconds",
        "refine_inter_token_latency_seconds",
        "refine_correction_seconds",
    ):
        assert re.search(rf'^{family}_bucket{{.*policy="none".*}} ', text, re.M), family
    assert re.search(r'^refine_requests_total{endpoint="completions",policy="none",status="200"} ', text, re.M)
    assert metric_total(text, "refine_upstream_request_duration_seconds_count") > 0
    # The engine's own families, from the same scrape.
    assert metric_total(text, "vllm:generation_tokens_total") > 0
    assert "vllm:e2e_request_latency_seconds_bucket" in text
    # Bounded labels: no request ids or prompts.
    assert "cmpl-" not in text and "a b c" not in text


def _engine_counters(engine_url: str) -> tuple[float, float]:
    text = httpx.get(f"{engine_url}/metrics").text
    return metric_total(text, "vllm:generation_tokens_total"), metric_total(text, "vllm:num_requests_running")


def _refine_disconnects(refine_url: str) -> float:
    return sum(
        float(v)
        for v in re.findall(
            r'^refine_requests_total{[^}]*status="499"[^}]*} (\S+)$', httpx.get(f"{refine_url}/metrics").text, re.M
        )
    )


def _assert_generation_stopped(
    refine_url: str, engine_url: str, tokens_before: float, disconnects_before: float, max_tokens: int
) -> None:
    """refine records the 499 only after the request's engine calls were cancelled and awaited, so once it is
    counted no new generation can start for it; once the engine runs nothing, the token count is final."""
    deadline = time.monotonic() + 30  # guards against waiting forever; no assertion depends on the clock
    while _refine_disconnects(refine_url) <= disconnects_before:
        assert time.monotonic() < deadline, "refine never recorded the client's disconnect (499)"
        time.sleep(0.1)
    while _engine_counters(engine_url)[1] > 0:
        assert time.monotonic() < deadline, "the engine kept running a request after refine cancelled it"
        time.sleep(0.1)
    tokens = _engine_counters(engine_url)[0]
    assert 0 < tokens - tokens_before < max_tokens / 2


@pytest.mark.parametrize(
    "stream, refine",
    [
        (True, {"policy": "none"}),
        (False, {"policy": "none"}),
        (False, {"policy": "srgen", "max_corrections": 1}),  # in the engine
        (False, {"policy": "cyberv", "n": 2, "max_reasoning_tokens": 1900}),  # several engine calls at once
    ],
    ids=["none-stream", "none", "srgen", "cyberv"],
)
def test_client_disconnect_cancels_the_generation(refine_server, engine_url: str, stream: bool, refine: dict) -> None:
    """Streaming, the client leaves after a few chunks; not streaming, before any byte of the answer."""
    max_tokens = 1900  # fits the test server's 2048-token context
    body = {
        "model": MODEL,
        "prompt": "Tell a long story:",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "refine": refine,
    }
    before, _ = _engine_counters(engine_url)
    disconnects = _refine_disconnects(refine_server.url)
    if stream:
        with httpx.stream("POST", f"{refine_server.url}/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for i, _line in enumerate(resp.iter_lines()):
                if i >= 10:
                    break
    else:
        asyncio.run(_leave_once_generating(f"{refine_server.url}/v1/completions", body, engine_url, before))
    _assert_generation_stopped(refine_server.url, engine_url, before, disconnects, max_tokens)


async def _leave_once_generating(url: str, body: dict, engine_url: str, tokens_before: float) -> None:
    """Send a non-streaming request and hang up, with no byte of the answer received, once the engine is
    generating for it (however long a cold engine takes to start)."""
    async with httpx.AsyncClient(timeout=120) as client:
        request = asyncio.create_task(client.post(url, json=body))
        deadline = time.monotonic() + 120  # a guard against waiting forever, not a timing check
        while (await asyncio.to_thread(_engine_counters, engine_url))[0] <= tokens_before:
            assert not request.done(), f"the request ended before the engine generated: {request.result()}"
            assert time.monotonic() < deadline, "the engine never started generating"
            await asyncio.sleep(0.1)
        request.cancel()  # closes the connection: refine sees the client leave
        with contextlib.suppress(asyncio.CancelledError):
            await request


def test_external_mode_serves_an_existing_vllm_with_per_key_policies(engine_url: str) -> None:
    keys = json.dumps(["admin", {"key": "plain-only", "policies": ["none"]}])
    server = start_refine(
        "external",
        free_port(),
        "--backend-url",
        engine_url,
        ready_timeout_s=60,
        env={**ENGINE_ENV, "REFINE_API_KEYS": keys},
    )
    try:
        admin = OpenAI(base_url=f"{server.url}/v1", api_key="admin", max_retries=0)
        plain = OpenAI(base_url=f"{server.url}/v1", api_key="plain-only", max_retries=0)
        resp = plain.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0
        )
        assert resp.choices[0].message.content
        assert resp.model_extra["refine"]["policy"] == "none"
        with pytest.raises(openai.PermissionDeniedError):
            plain.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"refine": {"policy": "srgen"}})
        # External mode signs with the secret the operator gave both sides, and reads the shared events folder.
        srgen = admin.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=4,
            temperature=0,
            extra_body={"refine": {"policy": "srgen", "max_corrections": 1, "warmup_threshold": 0, "min_threshold": 0}},
        )
        assert srgen.model_extra["refine"]["trace"]["num_corrections"] == 1
        # External mode scrapes only refine: the fleet is scraped where it runs.
        assert "vllm:" not in httpx.get(f"{server.url}/metrics").text
    finally:
        stop_refine(server)


def test_several_workers_share_one_port_and_their_metrics_add_up(engine_url: str) -> None:
    server = start_refine(
        "workers",
        free_port(),
        "--backend-url",
        engine_url,
        "--workers",
        "2",
        "--backend-metrics",
        "true",
        ready_timeout_s=60,
        env=ENGINE_ENV,
    )
    try:
        workers = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        sent = 8
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: client.completions.create(model=MODEL, prompt=f"Count to {i}", max_tokens=2), range(sent)
                )
            )
        # Each scrape is answered by whichever worker accepts it; every one must see all workers' requests.
        scrapes = [httpx.get(f"{server.url}/metrics").text for _ in range(6)]
        assert [metric_total(s, "refine_requests_total") for s in scrapes] == [sent] * 6
        assert all("vllm:" in s for s in scrapes)  # --backend-metrics: the engine's own, in the same scrape
    finally:
        stop_refine(server)


def test_srgen_goes_only_to_the_backend_whose_plugin_runs_it(engine_url: str) -> None:
    """The real engine (with the plugin) and a fake vLLM (without) behind one refine."""
    with serve_in_thread(make_app()) as fake:
        server = start_refine(
            "two-backends",
            free_port(),
            "--backend-url",
            f"{fake},{engine_url}",
            "--workers",
            "1",
            ready_timeout_s=60,
            env=ENGINE_ENV,
        )
        try:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            forced = {"policy": "srgen", "max_corrections": 1, "warmup_threshold": 0, "min_threshold": 0}
            for _ in range(3):
                resp = client.completions.create(
                    model=MODEL, prompt="hi", max_tokens=4, temperature=0, extra_body={"refine": forced}
                )
                assert resp.model_extra["refine"]["trace"]["num_corrections"] == 1
            plain = {
                client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).choices[0].text
                for _ in range(4)
            }
            assert "alpha beta gamma" in plain and len(plain) == 2  # plain requests go to both
            assert httpx.get(f"{fake}/fake/stats").json()["completions"] == 2 + 1  # + the one handshake
        finally:
            stop_refine(server)


def test_with_a_replica_gone_the_real_engine_takes_every_request_until_it_is_probed_back_in(engine_url: str) -> None:
    """The real engine and a fake vLLM behind one refine: requests spread over both; with the fake gone none is
    lost, streamed or not (the real engine answers them); once the fake is back on its port, the probe returns
    it to the rotation."""
    port = free_port()
    fake = serve_in_thread(make_app(), port)
    fake_url = fake.__enter__()
    server = start_refine(
        "failover",
        free_port(),
        "--backend-url",
        f"{fake_url},{engine_url}",
        "--workers",
        "1",
        ready_timeout_s=60,
        env=ENGINE_ENV,
    )
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def texts(count: int, stream: bool = False) -> set[str]:
            found = set()
            for _ in range(count):
                if stream:
                    chunks = client.completions.create(
                        model=MODEL, prompt="hi", max_tokens=3, temperature=0, stream=True
                    )
                    found.add("".join(c.choices[0].text for c in chunks if c.choices))
                else:
                    found.add(
                        client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).choices[0].text
                    )
            return found

        spread = texts(4)
        assert FAKE_TEXT in spread and len(spread) == 2  # ties taken in turn: both replicas answer
        real = (spread - {FAKE_TEXT}).pop()

        fake.__exit__(None, None, None)  # the replica goes away
        assert texts(4) == texts(4, stream=True) == {real}  # nothing lost, nothing from the fake
        assert metric_total(httpx.get(f"{server.url}/metrics").text, "refine_upstream_failovers_total") >= 1

        with serve_in_thread(make_app(), port):  # and comes back on its port
            deadline = time.monotonic() + 30  # probes run every 2 s
            while FAKE_TEXT not in texts(2):
                assert time.monotonic() < deadline, "the replica that came back was never probed back in"
    finally:
        fake.__exit__(None, None, None)  # a no-op once it has stopped
        stop_refine(server)


FAKE_TEXT = "alpha beta gamma"  # what tests/fake_vllm.py answers
