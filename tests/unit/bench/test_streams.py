"""bench/streams.py against bench/standin_upstream.py: every token's arrival is timed on both endpoints, and the
usage chunk is read where the stream sends one."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from standin_upstream import app
from streams import timed_stream

from tests.fake_vllm import serve_in_thread


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_each_token_of_a_stream_is_timed_and_its_usage_read(path: str) -> None:
    body = {"model": "standin", "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}

    async def stream(url: str):
        async with httpx.AsyncClient() as client:
            return await timed_stream(client, url + path, body)

    with serve_in_thread(app(tokens=64, interval_ms=5)) as url:
        timed = asyncio.run(stream(url))
    assert len(timed.arrivals) == 12 and timed.usage is not None and timed.usage["completion_tokens"] == 12
    assert 0 < timed.ttft_s < timed.ended - timed.started
    assert len(timed.gaps_s) == 11 and all(gap >= 0 for gap in timed.gaps_s)
    assert sum(timed.gaps_s) == pytest.approx(timed.arrivals[-1] - timed.arrivals[0])
