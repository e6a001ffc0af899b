"""Heavy policies beside plain traffic on the real engine: the default max_tokens bounds requests and policies'
calls, and the embedded engine schedules by the priority refine sends.

A second refine in external mode on the session's engine carries the settings under test (a default of 8
tokens, priorities sent, two keys), so no second engine starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.conftest import ENGINE_ENV, ENGINE_PORT, MODEL, RunningServer, start_refine, stop_refine
from tests.fake_vllm import free_port

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "Explain in detail how a bicycle works."}]
KEYS = [
    {"key": "interactive-key", "name": "interactive"},
    # Its plain requests go at the priority policies' calls get by default, and lower still.
    {"key": "batch-key", "name": "batch", "policy_priority": {"none": 5}},
]


@pytest.fixture(scope="module")
def heavy(engine_url: str) -> Iterator[RunningServer]:
    server = start_refine(
        "wt30-heavy",
        free_port(),
        "--backend-url",
        engine_url,
        "--default-max-tokens",
        "8",
        "--engine-priority-scheduling",
        "true",
        "--api-keys",
        json.dumps(KEYS),
        ready_timeout_s=60,
        env=ENGINE_ENV,
    )
    yield server
    stop_refine(server)


def _client(server: RunningServer, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def test_a_request_without_max_tokens_is_bounded_by_the_default_on_both_endpoints(heavy: RunningServer) -> None:
    client = _client(heavy, "interactive-key")
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"
    assert chat.model_extra["refine"]["server_defaults"] == {"max_tokens": 8}
    text = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}
    )
    assert text.usage.completion_tokens == 8 and text.model_extra["refine"]["server_defaults"] == {"max_tokens": 8}


def test_a_policys_answer_and_engine_calls_are_bounded_by_the_default(heavy: RunningServer) -> None:
    resp = _client(heavy, "interactive-key").chat.completions.create(
        model=MODEL, messages=QUESTION, extra_body={"refine": {"policy": "rain", "max_engine_calls": 40}}
    )
    trace = resp.model_extra["refine"]["trace"]
    assert trace["max_tokens"] == 8 and trace["answer_tokens"] <= 8
    assert resp.model_extra["refine"]["server_defaults"] == {"max_tokens": 8}


def test_the_embedded_engine_schedules_by_priority(refine_server: RunningServer) -> None:
    engine = next(
        p
        for p in psutil.process_iter(["cmdline"])
        if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])
        and str(ENGINE_PORT) in (p.info["cmdline"] or [])
    )
    args = engine.info["cmdline"]
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    listing = httpx.get(f"{refine_server.url}/v1/refine/policies").json()["data"]
    priority = {p["name"]: p["admission"]["engine_priority"] for p in listing}
    assert priority["none"] == 0 and all(priority[name] == 1 for name in ("rain", "cyberv", "srgen"))


def test_the_engine_serves_a_higher_priority_request_before_lower_ones_that_came_first(heavy: RunningServer) -> None:
    """The test engine's KV cache holds 66 blocks of 32 tokens. Four batch requests (priority 5) of 485 prompt
    tokens take 64 of them; a short interactive request (priority 0) sent after them waits for room. When the
    batch requests outgrow the cache the engine preempts one (14 blocks free). Under priority scheduling the
    interactive request heads the waiting queue and fits, so it runs at once and finishes first; first come, first
    served, the preempted batch request heads the queue, does not fit, and blocks it until a batch request ends
    (vLLM's own Scheduler, stepped without a model, gives: priority r9 r0 r1 r2 r3; fcfs r0 r1 r2 r9 r3)."""
    finished: dict[str, float] = {}

    def run(key: str, label: str, words: int, max_tokens: int) -> None:
        # Each prompt starts differently: with one prompt the prefix cache would share its blocks.
        prompt = f"Request {label}." + " word" * words
        resp = _client(heavy, key).completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        assert resp.usage.completion_tokens == max_tokens
        finished[label] = time.monotonic()

    with ThreadPoolExecutor(5) as pool:
        batch = [pool.submit(run, "batch-key", f"batch{i}", 480, 160) for i in range(4)]
        time.sleep(1.0)  # the four are in the engine first
        interactive = pool.submit(run, "interactive-key", "interactive", 95, 32)
        for future in [*batch, interactive]:
            future.result()
    order = sorted(finished, key=finished.__getitem__)
    assert order[0] == "interactive", order
