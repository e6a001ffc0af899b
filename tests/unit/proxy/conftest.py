"""The proxy's unit tests run refine in front of tests/fake_vllm.py: one fake backend and one proxy per test module.
`client` here is the proxy's, not the real server's of tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from refine_server.config import Settings
from tests.fake_vllm import app as fake_vllm_app
from tests.fake_vllm import serve_in_thread
from tests.unit.proxy.helpers import _serve


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[str]:
    with serve_in_thread(fake_vllm_app) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(fake_backend: str) -> Iterator[str]:
    with _serve(Settings(backend_url=fake_backend)) as url:
        yield url


@pytest.fixture(scope="module")
def client(proxy: str) -> OpenAI:
    return OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)
