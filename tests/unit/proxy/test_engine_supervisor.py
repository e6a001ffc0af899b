"""The embedded engine's supervisor with a stand-in for vLLM that fails to start: restarted while its failures
differ, given up on once it fails the same way on consecutive starts, with its last error in /ready."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import pytest

from refine_server import engine as engine_module
from refine_server.app import create_app
from refine_server.config import Settings
from refine_server.engine import EmbeddedEngine, EngineSpec, last_error
from refine_server.metrics import Metrics
from tests.fake_vllm import free_port, serve_in_thread

# What vLLM prints when it cannot load a model: log lines with its prefixes, then a traceback on stderr.
# `attempt` counts the starts in a file; ERRORS[attempt] (the last one from then on) is the start's error.
FAILING_VLLM = r"""
import os, sys
counter, errors = sys.argv[1], sys.argv[2:]
attempt = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(attempt + 1))
print(f"(APIServer pid={os.getpid()}) INFO 12-07 10:00:0{attempt} [api_server.py:1] vLLM API server version 0.32")
print("Traceback (most recent call last):\n  File \"loader.py\", line 9, in load", file=sys.stderr)
print(errors[min(attempt, len(errors) - 1)], file=sys.stderr)
sys.exit(1)
"""


class FailingSpec(EngineSpec):
    """Starts FAILING_VLLM instead of vLLM."""

    counter: Path
    errors: list[str]

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAILING_VLLM, str(self.counter), *self.errors]


def _spec(tmp_path: Path, errors: list[str]) -> FailingSpec:
    spec = FailingSpec(
        model_dir=tmp_path,
        cache_dir=tmp_path,
        served_model_name="m",
        port=free_port(),
        max_model_len=128,
        kv_cache_gib=1,
    )
    spec.counter, spec.errors = tmp_path / "starts", errors
    return spec


async def _until_failed(engine: EmbeddedEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.state != "failed":
        assert time.monotonic() < deadline, f"not given up on: {engine.state} ({engine.reason})"
        await asyncio.sleep(0.1)


def test_the_last_error_is_the_exception_line_without_vllms_log_prefix() -> None:
    output = (
        "(APIServer pid=7) INFO 12-07 10:00:01 [api_server.py:1] starting\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "(EngineCore pid=9) ERROR 12-07 10:00:02 [core.py:7] ValueError: no model in /m\n"
        "(APIServer pid=7) INFO 12-07 10:00:03 [launcher.py:2] shutting down\n"
    )
    assert last_error(output) == "ValueError: no model in /m"
    assert last_error("(APIServer pid=7) WARNING 12-07 10:00:03 [x.py:2] killed\n\n") == "killed"
    # pydantic's errors (vLLM's for a folder without a model) give the reason on the lines after the exception.
    invalid = (
        "Traceback (most recent call last):\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, Invalid repository ID or local directory specified: '/m'.\n"
        "Please verify the following requirements:\n1. Provide a valid Hugging Face repository ID.\n"
        "(APIServer pid=7) INFO 12-07 10:00:03 [launcher.py:2] shutting down\n"
    )
    assert last_error(invalid) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
        "Value error, Invalid repository ID or local directory specified: '/m'. "
        "Please verify the following requirements:"
    )
    assert last_error("") == "no output"


async def test_different_failures_are_retried_and_the_same_one_twice_is_given_up(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["OSError: port busy", "OSError: no config.json in /m", "OSError: no config.json in /m"])
    engine = EmbeddedEngine(spec, Metrics({}), start_timeout_s=30, give_up_after=2)
    engine.start()
    try:
        await _until_failed(engine)
    finally:
        await engine._supervisor  # it ended by itself: no process is left to stop
    # The first failure differed from the next two: three starts, not two.
    assert (tmp_path / "starts").read_text() == "3"
    assert "2 times in a row" in engine.reason and "OSError: no config.json in /m" in engine.reason
    assert engine._proc is None


def test_ready_says_why_the_engine_was_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    errors = ["ValueError: the model folder has no config.json"]
    monkeypatch.setattr(
        engine_module.EngineSpec,
        "command",
        lambda spec: [sys.executable, "-c", FAILING_VLLM, str(tmp_path / "starts"), *errors],
    )
    settings = Settings(model=str(tmp_path), engine_port=free_port(), engine_secret="s" * 64)
    with serve_in_thread(create_app(settings)) as url:
        deadline = time.monotonic() + 30
        while "not restarting" not in (reason := httpx.get(f"{url}/ready").json()["reason"]):
            assert time.monotonic() < deadline, reason
            time.sleep(0.1)
        assert httpx.get(f"{url}/ready").status_code == 503
        assert errors[0] in reason and f"{engine_module.GIVE_UP_AFTER} times in a row" in reason
        assert (tmp_path / "starts").read_text() == str(engine_module.GIVE_UP_AFTER)
