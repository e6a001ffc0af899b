"""API keys against a fake backend (no engine): required when configured, and per-key policies and caps."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from refine_server.app import create_app
from refine_server.config import Settings
from tests.fake_vllm import MODEL
from tests.unit.proxy.helpers import _serve


def test_api_keys_are_required_when_configured(fake_backend: str) -> None:
    with _serve(Settings(backend_url=fake_backend, api_keys=["k1", "k2"])) as url:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = OpenAI(base_url=f"{url}/v1", api_key="k2", max_retries=0)
        assert [m.id for m in ok.models.list()] == [MODEL]
        # Liveness and metrics stay open for probes and scrapers.
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_api_keys_limit_policies_and_caps_per_key(fake_backend: str) -> None:
    keys = [
        "admin-key",
        {"key": "basic-key", "policies": ["none", "steps"], "policy_limits": {"steps": {"max_steps": 2}}},
    ]
    with _serve(Settings(backend_url=fake_backend, api_keys=keys)) as url:
        basic = OpenAI(base_url=f"{url}/v1", api_key="basic-key", max_retries=0)
        admin = OpenAI(base_url=f"{url}/v1", api_key="admin-key", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as err:
            basic.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "in_engine"}})
        assert err.value.body["param"] == "refine.policy" and "in_engine" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            basic.completions.create(
                model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 3}}
            )
        assert "limit of 2" in err.value.body["message"]
        basic.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 2}})
        # The other key keeps the server's own caps.
        admin.completions.create(model=MODEL, prompt="hi", extra_body={"refine": {"policy": "steps", "max_steps": 5}})
    with pytest.raises(KeyError):
        create_app(Settings(backend_url=fake_backend, api_keys=[{"key": "k", "policies": ["nosuch"]}]))
