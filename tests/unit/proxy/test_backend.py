"""The backend as the proxy sees it, against a fake vLLM without refine's plugin (no engine): the plugin handshake,
and the backend's failures as OpenAI errors."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from refine_server.backend import Backend
from refine_server.config import Settings
from refine_server.contract.protocol import (
    HANDSHAKE_REPLY,
    PROTOCOL_VERSION,
    EngineLink,
    Handshake,
    PluginInfo,
    handshake_reply,
)
from refine_server.errors import APIError
from refine_server.metrics import Metrics
from tests.fake_vllm import MODEL, free_port, serve_in_thread
from tests.unit.proxy.helpers import _serve


def test_a_backend_without_the_plugin_is_asked_once_not_per_request(client: OpenAI, fake_backend: str) -> None:
    def handshakes() -> int:
        return httpx.get(f"{fake_backend}/fake/stats").json()["refine_xargs_requests"]

    before = handshakes()
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
    assert handshakes() - before <= 1


def test_in_engine_policy_on_a_backend_without_the_plugin_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
    assert err.value.code == "engine_plugin_missing"
    assert "engine plugin" in err.value.body["message"]


def test_backend_500_becomes_a_502_with_openai_error(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="FAIL_500")
    assert err.value.status_code == 502
    assert "engine exploded" in err.value.body["message"]


def test_error_in_the_middle_of_a_stream_reaches_the_client(client: OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="FAIL_MIDSTREAM", stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(stream)


def test_backend_down_gives_503_and_not_ready() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with _serve(Settings(backend_url=dead)) as url:
        assert httpx.get(f"{url}/ready").status_code == 503
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "backend_unavailable"
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True}, timeout=30)
        assert resp.status_code == 503


# ---- the handshake's reply, read by the proxy --------------------------------------------------------------


def _refusing(message: str) -> Starlette:
    """A server that answers every completion with a 400 carrying `message`, as vLLM relays a plugin's refusal."""

    async def completions(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": 400}}, 400)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


async def _ask(message: str, tmp_path) -> PluginInfo | None:
    with serve_in_thread(_refusing(message)) as url:
        backend = Backend(url, Metrics({}), EngineLink(secret="s", events_dir=tmp_path), timeout_s=10)
        try:
            return await backend.plugin(MODEL)
        finally:
            await backend.aclose()


def _reply(**changes) -> str:
    report = Handshake(
        protocol=PROTOCOL_VERSION, version="1.2.3", policies=["srgen"], signature="ok", limits={}, unsupported=[]
    ).model_copy(update=changes)
    return handshake_reply(report)


async def test_a_plugin_reply_is_read_from_the_refusal(tmp_path) -> None:
    info = await _ask(_reply(), tmp_path)
    assert info is not None and info.handshake.version == "1.2.3" and info.handshake.policies == ["srgen"]
    assert info.events_shared is False  # the stand-in wrote no event where the proxy looks


async def test_a_server_that_refuses_without_a_reply_has_no_plugin(tmp_path) -> None:
    assert await _ask("Unrecognized request argument: vllm_xargs", tmp_path) is None


@pytest.mark.parametrize("message", [_reply(protocol=PROTOCOL_VERSION + 1), HANDSHAKE_REPLY + "{not json"])
async def test_a_plugin_of_another_protocol_is_a_502_naming_the_mismatch(message: str, tmp_path) -> None:
    with pytest.raises(APIError) as err:
        await _ask(message, tmp_path)
    assert (err.value.status, err.value.code) == (502, "engine_plugin_mismatch")
