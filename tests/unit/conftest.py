"""Tests under tests/unit/ never start the real vLLM server: they use fakes (tests/fake_vllm.py, scripted backends)
and vLLM's own Python code paths. A test that needs the server belongs in tests/engine/; collection stops here
otherwise, so that `pytest tests/unit` stays fast and needs no engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The servers these tests start stand in front of fakes: none should load RAIN's embedding model in the
# background (refine_server/warmup.py, on by default). test_warmup.py turns it on where it is tested.
os.environ.setdefault("REFINE_WARM_UP", "false")

UNIT_TESTS = Path(__file__).parent
ENGINE_FIXTURES = {"refine_server", "engine_url", "second_family_server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    misplaced = [
        item.nodeid
        for item in items
        if UNIT_TESTS in item.path.parents
        and (item.get_closest_marker("engine") or ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())))
    ]
    if misplaced:
        raise pytest.UsageError(
            "these tests need the real engine; move them to tests/engine/:\n  " + "\n  ".join(misplaced)
        )
