"""The SSE relay: a stream whose policy does not change it goes out as the backend sent it."""

from __future__ import annotations

import json

import httpx

from tests.fake_vllm import MODEL


def _events(url: str, body: dict) -> list[bytes]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        return [event for event in resp.read().split(b"\n\n") if event]


def test_a_relayed_stream_is_the_backends_byte_for_byte_but_the_refine_block(proxy: str, fake_backend: str) -> None:
    body = {"model": MODEL, "prompt": ["a", "b"], "stream": True}
    direct, relayed = _events(fake_backend, body), _events(proxy, body)
    assert len(relayed) == len(direct) == 7  # three tokens for each of two prompts, then [DONE]
    differing = [(d, r) for d, r in zip(direct, relayed, strict=True) if d != r]
    assert len(differing) == 1  # the chunk that finishes the last choice, and only it
    upstream, ours = (json.loads(event.removeprefix(b"data: ")) for event in differing[0])
    assert ours.pop("refine")["policy"] == "none"
    assert ours == upstream
