"""Shared fixtures. The real refine server (and its embedded vLLM) starts once per test session.

tests/unit/ never starts it (`pytest tests/unit`); tests/engine/ uses it, and everything there is marked `engine`
(`pytest tests/engine`, or `pytest -m "not engine"` for the rest). Tests marked `disruptive` (they kill the engine)
run after all others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from refine_server.backend import Backend
from refine_server.contract.protocol import EngineLink
from refine_server.metrics import Metrics
from refine_server.models.catalog import DEFAULT_MODEL, QWEN25_CODER
from refine_server.policies.base import PolicyCall
from refine_server.policies.engine_client import EngineClient
from refine_server.policies.none import NonePolicy
from refine_server.schemas import ChatCompletionRequest, CompletionRequest

MODEL = DEFAULT_MODEL.name
# The test engine serves its model under a second name too: a stand-in for a second model (RAIN's judge_model).
SECOND_MODEL_NAME = "second-name-of-the-test-model"
REFINE_PORT = int(os.environ.get("REFINE_TEST_PORT", "18000"))
ENGINE_PORT = int(os.environ.get("REFINE_TEST_ENGINE_PORT", "18100"))
LOG_DIR = Path(os.environ.get("REFINE_TEST_LOG_DIR", "/tmp/refine-test-logs"))
# The test engine's secret and events folder are known to the tests, so they can talk to the engine plugin
# directly (as a client reaching vLLM's port would), and it accepts injected faults.
ENGINE_SECRET = "test-engine-secret-" + "0" * 45
ENGINE_EVENTS_DIR = Path(os.environ.get("REFINE_TEST_EVENTS_DIR", "/tmp/refine-test-events"))
# The test engine's KV cache holds one full-length sequence and little more (66 blocks of 32 tokens; vLLM wants a
# bit more than max_model_len), so a few long concurrent requests get preempted and resumed, as on a busy GPU.
ENGINE_KV_BLOCKS = 66
ENGINE_ENV = {
    "REFINE_ENGINE_SECRET": ENGINE_SECRET,
    "REFINE_ENGINE_EVENTS_DIR": str(ENGINE_EVENTS_DIR),
    "REFINE_ENGINE_ALLOW_FAULTS": "1",
}
# A second engine on the default model, in float32, for the checks against a float32 recomputation (the session's
# engine computes in bf16 on a CPU with bf16 units, whose numbers differ from float32 ones by far more than the
# sensor's 1e-3, and whose SRGen gradients flip the sign of AdamW's first steps on small coordinates).
FLOAT32_PORT_OFFSET = 50
# The second bundled model, from another family (152k vocabulary, Hermes tool calls): its own refine and engine,
# started once for the session by the first test that asks for it, on ports beside the default model's.
SECOND_FAMILY_MODEL = QWEN25_CODER.name
SECOND_FAMILY_PORT_OFFSET = 200


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_refine(
    name: str, port: int, *args: str, ready_timeout_s: float = 900.0, env: dict[str, str] | None = None
) -> RunningServer:
    """`python -m refine_server` as a user would run it, logging to a file; waits for /ready."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "refine_server", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"refine exited early:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_refine(server)
    raise RuntimeError(f"refine not ready after {ready_timeout_s} s:\n{server.log_tail()}")


def wait_until_listening(server: RunningServer, timeout_s: float = 60.0) -> None:
    """For a server whose backend is meant to be down: wait for liveness, not readiness."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"refine not listening:\n{server.log_tail()}")


def stop_refine(server: RunningServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def policy_call(endpoint: str, body: dict, backend: object) -> PolicyCall:
    """A PolicyCall as refine's route builds it: the body parsed by refine's schemas, an EngineClient on
    `backend` (a real Backend, or a scripted one with the same post_json / stream_json)."""
    parsed = (ChatCompletionRequest if endpoint == "chat" else CompletionRequest).model_validate(body)
    request = parsed.client_request(endpoint, dict(body))  # type: ignore[arg-type]
    return PolicyCall(request, EngineClient(backend, request))  # type: ignore[arg-type]


@asynccontextmanager
async def engine_client_on(
    engine_port: int, prompt: str, *, model: str = MODEL, timeout_s: float = 120
) -> AsyncIterator[EngineClient]:
    """An EngineClient straight on a test engine's port (its secret and events folder), as a policy gets one
    from refine: for tests that drive the engine plugin without a policy in between."""
    backend = Backend(
        f"http://127.0.0.1:{engine_port}",
        Metrics({"none": NonePolicy.metrics}),
        timeout_s=timeout_s,
        link=EngineLink(secret=ENGINE_SECRET, events_dir=ENGINE_EVENTS_DIR),
    )
    try:
        yield policy_call("completions", {"model": model, "prompt": prompt}, backend).engine
    finally:
        await backend.aclose()


def metric_total(exposition: str, name: str) -> float:
    """Sum of every sample of one Prometheus metric (all label sets) in a /metrics text."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", exposition, re.M))


@pytest.fixture(scope="session")
def refine_server() -> Iterator[RunningServer]:
    server = start_refine(
        "embedded",
        REFINE_PORT,
        "--engine-port",
        str(ENGINE_PORT),
        "--engine-max-model-len",
        "2048",
        "--max-tokens-limit",
        "3000",
        "--engine-args",
        json.dumps(
            ["--num-gpu-blocks-override", str(ENGINE_KV_BLOCKS), "--served-model-name", MODEL, SECOND_MODEL_NAME]
        ),
        env=ENGINE_ENV,
    )
    yield server
    stop_refine(server)


@pytest.fixture(scope="session")
def float32_server() -> Iterator[RunningServer]:
    """refine on the default model with a float32 engine, started by the first test that asks for it."""
    server = start_refine(
        "embedded-float32",
        REFINE_PORT + FLOAT32_PORT_OFFSET,
        "--engine-port",
        str(ENGINE_PORT + FLOAT32_PORT_OFFSET),
        "--engine-max-model-len",
        "2048",
        "--engine-args",
        json.dumps(["--dtype", "float32", "--num-gpu-blocks-override", str(ENGINE_KV_BLOCKS)]),
        env=ENGINE_ENV,
    )
    yield server
    stop_refine(server)


@pytest.fixture(scope="session")
def second_family_server() -> Iterator[RunningServer]:
    """refine serving the second bundled model by its name, as `refine --model NAME` does. float32: the sensor's
    numbers are checked against a float32 recomputation within 1e-3, which bf16 logits would miss."""
    server = start_refine(
        "embedded-second-family",
        REFINE_PORT + SECOND_FAMILY_PORT_OFFSET,
        "--model",
        SECOND_FAMILY_MODEL,
        "--engine-port",
        str(ENGINE_PORT + SECOND_FAMILY_PORT_OFFSET),
        "--engine-max-model-len",
        "2048",
        "--engine-args",
        json.dumps(["--dtype", "float32"]),
        env=ENGINE_ENV,
    )
    yield server
    stop_refine(server)


@pytest.fixture(scope="session")
def engine_url(refine_server: RunningServer) -> str:
    """The embedded vLLM itself, for comparing refine's answers with the engine's."""
    return f"http://127.0.0.1:{ENGINE_PORT}"


@pytest.fixture(scope="session")
def client(refine_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{refine_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
