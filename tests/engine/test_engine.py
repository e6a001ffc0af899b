"""The supervisor: a dead embedded engine ends the requests in flight with errors, gives 503s while it restarts,
then refine serves again."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from tests.conftest import ENGINE_PORT, MODEL

pytestmark = [pytest.mark.engine, pytest.mark.disruptive]


def _engine_server_pid() -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == ENGINE_PORT and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise AssertionError(f"nothing listens on the engine port {ENGINE_PORT}")


def test_killed_engine_is_restarted(refine_server, client: OpenAI) -> None:
    """Requests in flight when the engine dies end with an OpenAI error (a hang would end in the client's own
    timeout instead), the server says it is restarting, then serves again."""
    patient = OpenAI(base_url=f"{refine_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    long = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 1900, "extra_body": {"ignore_eos": True}}
    streams = [patient.completions.create(**long, stream=True) for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # under way
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: patient.completions.create(**long))
        os.kill(_engine_server_pid(), signal.SIGKILL)
        for stream in streams:
            with pytest.raises(openai.APIError) as err:
                for _ in stream:
                    pass
            assert not isinstance(err.value, openai.APITimeoutError)
        with pytest.raises(openai.APIError) as err:
            waiting.result()
        assert not isinstance(err.value, openai.APITimeoutError)

    deadline = time.monotonic() + 30
    while httpx.get(f"{refine_server.url}/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    ready = httpx.get(f"{refine_server.url}/ready")
    assert ready.status_code == 503 and "restart" in ready.json()["reason"]
    resp = httpx.post(f"{refine_server.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "backend_unavailable"

    deadline = time.monotonic() + 600
    while httpx.get(f"{refine_server.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, refine_server.log_tail()
        time.sleep(1)
    out = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0)
    assert out.choices[0].text
    assert "refine_engine_restarts_total 1.0" in httpx.get(f"{refine_server.url}/metrics").text
