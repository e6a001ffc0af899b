"""Policies load what they need in the background once a backend is ready, and say when they are warm."""

from __future__ import annotations

import asyncio
from typing import Any

from refine_server.config import Settings
from refine_server.policies import PolicyRegistry
from refine_server.policies.none import NonePolicy
from refine_server.warmup import WarmUp


class Loading(NonePolicy):
    name = "loading"
    warms_up = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.saw: list[dict[str, Any]] = []

    async def warm_up(self, served_models: list[dict[str, Any]]) -> None:
        self.saw = served_models
        await self.release.wait()


class Failing(NonePolicy):
    name = "failing"
    warms_up = True

    async def warm_up(self, served_models: list[dict[str, Any]]) -> None:
        raise RuntimeError("no embedding model here")


class _Backend:
    async def get_json(self, path: str) -> dict[str, Any]:
        assert path == "/v1/models"
        return {"data": [{"id": "m", "root": "/models/m"}]}


class _Upstreams:
    def __init__(self) -> None:
        self.backend: _Backend | None = None

    async def ready(self) -> _Backend | None:
        return self.backend


async def _until(condition: Any) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


async def test_policies_warm_up_once_a_backend_is_ready_and_report_their_state(monkeypatch) -> None:
    monkeypatch.setattr("refine_server.warmup.READY_POLL_S", 0.01)
    registry = PolicyRegistry([NonePolicy, Loading, Failing])
    warm_up = WarmUp(registry, enabled=True)
    upstreams = _Upstreams()
    warm_up.start(upstreams)  # type: ignore[arg-type]
    assert warm_up.state == {"failing": "pending", "loading": "pending", "none": "warm"}
    await asyncio.sleep(0.05)
    assert warm_up.state["loading"] == "pending"  # no backend yet
    upstreams.backend = _Backend()
    await _until(lambda: warm_up.state["failing"].startswith("failed"))
    assert warm_up.state["failing"] == "failed: no embedding model here"
    loading = registry.get("loading")
    await _until(lambda: warm_up.state["loading"] == "warming")
    assert not warm_up.is_warm("loading") and loading.saw == [{"id": "m", "root": "/models/m"}]
    loading.release.set()  # type: ignore[attr-defined]
    await _until(lambda: warm_up.is_warm("loading"))
    await warm_up.aclose()


async def test_warm_up_off_leaves_loading_to_the_first_request() -> None:
    warm_up = WarmUp(PolicyRegistry([NonePolicy, Loading]), enabled=False)
    warm_up.start(_Upstreams())  # type: ignore[arg-type]
    assert warm_up.is_warm("none") and not warm_up.is_warm("loading")
    assert warm_up.state["loading"] == "off: loads on first use"
    await warm_up.aclose()


def test_the_setting_is_on_by_default_and_off_in_these_tests() -> None:
    assert Settings.model_fields["warm_up"].default is True
    assert Settings().warm_up is False  # tests/unit/conftest.py: no embedding model behind fakes
