"""The engine plugin in the real engine: refine's handshake finds it, and the side door stays shut."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.backend import Backend
from refine_server.contract.protocol import EngineLink, signed_xargs
from refine_server.metrics import Metrics
from refine_server.policies.none import NonePolicy
from tests.conftest import ENGINE_EVENTS_DIR, ENGINE_SECRET, MODEL

pytestmark = pytest.mark.engine


async def test_handshake_finds_the_engine_plugin_in_the_embedded_server(engine_url: str) -> None:
    link = EngineLink(secret=ENGINE_SECRET, events_dir=ENGINE_EVENTS_DIR)
    backend = Backend(engine_url, Metrics({"none": NonePolicy.metrics}), link, timeout_s=30)
    try:
        plugin = await backend.plugin(MODEL)
    finally:
        await backend.aclose()
    assert plugin is not None and re.match(r"^\d+\.\d+", plugin.handshake.version)
    assert plugin.handshake.signature == "ok" and plugin.handshake.unsupported == []
    assert plugin.events_shared


# ---- the side door ----------------------------------------------------------------------------------------

HOSTILE_XARGS = {
    "refine_policy": "srgen",
    "refine_request_key": "ab" * 16,
    "refine_params": json.dumps({"steps": 100, "max_corrections": 10000, "warmup_threshold": 0, "min_threshold": 0}),
}


def test_a_client_cannot_switch_the_engine_plugin_on_through_refine(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=5,
            extra_body={"refine": {"policy": "none"}, "vllm_xargs": HOSTILE_XARGS},
        )
    assert err.value.body["param"].startswith("vllm_xargs.refine_")


@pytest.mark.parametrize("signed_with", [None, "the engine's secret"])
def test_the_plugin_refuses_requests_that_reach_vllms_port_directly(engine_url: str, signed_with) -> None:
    """Unsigned: refused. Signed (the secret leaked) but over the server's caps: refused by the plugin's own copy."""
    xargs = dict(HOSTILE_XARGS)
    if signed_with:
        xargs = signed_xargs(ENGINE_SECRET, "srgen", HOSTILE_XARGS["refine_params"])
    resp = httpx.post(
        f"{engine_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": "hi", "max_tokens": 5, "vllm_xargs": xargs},
    )
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert ("exceeds this server's limit" in message) if signed_with else ("signed" in message)
