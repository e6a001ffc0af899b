"""Every engine plugin unit test runs in the engine's environment: an events folder, the secret, the server's caps."""

from __future__ import annotations

import json

import pytest

from refine_server.contract.protocol import EVENTS_DIR_ENV, LIMITS_ENV, SECRET_ENV
from refine_server.engine_plugin import admission
from tests.unit.engine_plugin.helpers import SECRET


@pytest.fixture(autouse=True)
def engine_env(tmp_path, monkeypatch):
    monkeypatch.setenv(EVENTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(LIMITS_ENV, json.dumps({"srgen": {"steps": 4}, "token_stats": {"window": 128}}))
    admission.srgen_limits.cache_clear()
    admission.confidence_stop_limits.cache_clear()
    yield tmp_path
    admission.srgen_limits.cache_clear()
    admission.confidence_stop_limits.cache_clear()
