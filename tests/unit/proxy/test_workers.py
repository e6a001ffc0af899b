"""How many worker processes refine runs (the processes themselves are tested in tests/engine/test_app.py)."""

from __future__ import annotations

import pytest

from refine_server import workers
from refine_server.config import Settings


def test_the_operator_sets_the_worker_count() -> None:
    assert workers.worker_count(Settings(workers=3)) == 3


def test_a_cpu_engine_keeps_the_cores_and_a_proxy_takes_a_worker_per_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "running_on_cpu", lambda: True)
    assert workers.worker_count(Settings()) == 1
    external = Settings(backend_url="http://gpu-host:8000")
    for cores, expected in ((1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(workers.os, "cpu_count", lambda cores=cores: cores)
        assert workers.worker_count(external) == expected, cores
    monkeypatch.setattr(workers, "running_on_cpu", lambda: False)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 16)
    assert workers.worker_count(Settings()) == 4  # an embedded GPU engine: the cores are the proxy's
