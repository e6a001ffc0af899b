"""Heavy policies beside interactive traffic: plain streams' time to first token and throughput, alone and next to
RAIN and CyberV requests, before (no limits, first come first served) and after (per-policy limits, priorities).

Starts refine twice on the embedded engine, one configuration after the other:

    .venv/bin/python bench/load.py --duration 60 --out bench/results/load.json
    .venv/bin/python bench/load.py --configs after --plain-first-wait-s 2 --out ...   # one configuration

- before: `--engine-priority-scheduling false` (vLLM first come, first served), no concurrency limits;
- after:  the engine under `--scheduling-policy priority` (plain 0, policies 1) and `--policy-concurrency`
  (default `{"rain": 2, "cyberv": 2}`), `--policy-queue-timeout` 30, and `--plain-first-wait-s` (default 0: off;
  each engine call of a heavy request waits up to that long while plain requests run).

In each, `plain` streaming chat requests (8) run back to back for `duration` seconds, alone and then beside
`rain` (4) and `cyberv` (4) clients that send one request after another (a 429 is retried after its
Retry-After). Reported per configuration: the plain streams' TTFT p50/p95 and output tokens/s, their ratios to
the same streams alone, the heavy requests answered / refused, and the longest any heavy request went without
an answer (its first byte or its 429), which must stay within the queue timeout plus the policy's own time to a
first chunk. Targets (issue 30): mixed TTFT p95 <= 1.5x alone, throughput >= 0.8x alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from streams import timed_stream

from refine_server.models.catalog import DEFAULT_MODEL  # the embedded engine's model

MODEL = DEFAULT_MODEL.name

PLAIN = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
QUESTION = [{"role": "user", "content": "What is 17 * 23? Answer with the number."}]
CONFIGS = {
    "before": ["--engine-priority-scheduling", "false"],
    "after": ["--policy-queue-timeout", "30"],
}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else float("nan")


async def plain_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": MODEL, "messages": PLAIN, "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    timed = await timed_stream(client, f"{url}/v1/chat/completions", body)
    return timed.ttft_s, len(timed.arrivals)


async def heavy_client(client: httpx.AsyncClient, url: str, policy: str, stop_at: float, out: dict[str, Any]) -> None:
    """One request after another, streamed; a 429 waits its Retry-After. Records the longest wait for an answer."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "stream": True, "refine": {"policy": policy}}
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            out["longest_unanswered_s"] = max(out["longest_unanswered_s"], time.perf_counter() - started)
            if resp.status_code == 429:
                out["refused"] += 1
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                continue
            async for _ in resp.aiter_lines():
                pass
            out["answered" if resp.status_code == 200 else "failed"] += 1


async def scenario(url: str, duration: float, plain: int, heavy: dict[str, int], max_tokens: int) -> dict[str, Any]:
    stop_at = time.monotonic() + duration
    ttfts: list[float] = []
    tokens = 0
    heavy_out = {p: {"answered": 0, "refused": 0, "failed": 0, "longest_unanswered_s": 0.0} for p in heavy}

    async def plain_client(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.monotonic() < stop_at:
            ttft, n = await plain_stream(client, url, max_tokens)
            ttfts.append(ttft)
            tokens += n

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(
            *(plain_client(client) for _ in range(plain)),
            *(heavy_client(client, url, p, stop_at, heavy_out[p]) for p, count in heavy.items() for _ in range(count)),
        )
    wall = time.perf_counter() - started
    return {
        "plain_requests": len(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": p95(ttfts),
        "plain_tokens_per_s": tokens / wall,
        "heavy": heavy_out,
    }


def start(port: int, engine_port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "refine_server", "--port", str(port), "--engine-port", str(engine_port), *extra],
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError("refine did not become ready")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(120)


async def run_config(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    proc = start(args.port, args.engine_port, extra)
    url = f"http://127.0.0.1:{args.port}"
    try:
        await scenario(url, min(20.0, args.duration), 2, {"rain": 1, "cyberv": 1}, args.max_tokens)  # warm-up
        alone = await scenario(url, args.duration, args.plain, {}, args.max_tokens)
        mixed = await scenario(
            url, args.duration, args.plain, {"rain": args.rain, "cyberv": args.cyberv}, args.max_tokens
        )
    finally:
        stop(proc)
    return {
        "alone": alone,
        "mixed": mixed,
        "ttft_p95_ratio": mixed["ttft_p95_s"] / alone["ttft_p95_s"],
        "throughput_ratio": mixed["plain_tokens_per_s"] / alone["plain_tokens_per_s"],
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        "| config | plain TTFT p95 alone / mixed (s) | ratio | plain tok/s alone / mixed | ratio "
        "| rain answered/429 | cyberv answered/429 | longest unanswered (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        heavy = r["mixed"]["heavy"]
        longest = max(h["longest_unanswered_s"] for h in heavy.values())
        rows.append(
            f"| {name} | {r['alone']['ttft_p95_s']:.2f} / {r['mixed']['ttft_p95_s']:.2f} | "
            f"{r['ttft_p95_ratio']:.2f}x | {r['alone']['plain_tokens_per_s']:.0f} / "
            f"{r['mixed']['plain_tokens_per_s']:.0f} | {r['throughput_ratio']:.2f}x | "
            f"{heavy['rain']['answered']}/{heavy['rain']['refused']} | "
            f"{heavy['cyberv']['answered']}/{heavy['cyberv']['refused']} | {longest:.1f} |"
        )
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per scenario")
    parser.add_argument("--plain", type=int, default=8)
    parser.add_argument("--rain", type=int, default=4)
    parser.add_argument("--cyberv", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64, help="plain streams' max_tokens")
    parser.add_argument("--concurrency", default='{"rain": 2, "cyberv": 2}', help="after: --policy-concurrency")
    parser.add_argument("--plain-first-wait-s", type=float, default=0.0, help="after: --plain-first-wait-s")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine-port", type=int, default=8100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS), help="which configurations to run"
    )
    args = parser.parse_args()
    results = {}
    for name, extra in CONFIGS.items():
        if name not in args.configs:
            continue
        if name == "after":
            extra = [
                *extra,
                "--policy-concurrency",
                args.concurrency,
                "--plain-first-wait-s",
                str(args.plain_first_wait_s),
            ]
        results[name] = await run_config(args, extra)
    print(table(results))
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    asyncio.run(main())
