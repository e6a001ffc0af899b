"""How many worker processes refine runs (the processes themselves are tested in tests/engine/test_app.py)."""

from __future__ import annotations

import os

import pytest

from refine_server import workers
from refine_server.config import Settings


def test_the_operator_sets_the_worker_count() -> None:
    assert workers.worker_count(Settings(workers=3)) == 3


def test_an_embedded_cpu_engine_keeps_the_cores_and_a_proxy_alone_uses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "running_on_cpu", lambda: True)
    assert workers.worker_count(Settings()) == 1
    assert workers.worker_count(Settings(backend_url="http://gpu-host:8000")) == min(4, os.cpu_count() or 1)
    monkeypatch.setattr(workers, "running_on_cpu", lambda: False)
    assert workers.worker_count(Settings()) == min(4, os.cpu_count() or 1)
