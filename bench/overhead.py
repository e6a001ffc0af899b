"""Proxy overhead: refine (policy `none`) against the same vLLM server called directly, in one run.

Start refine first (`make serve`); its embedded engine listens on 127.0.0.1:8100. Then:

    .venv/bin/python bench/overhead.py --refine http://127.0.0.1:8000 --engine http://127.0.0.1:8100

For each concurrency level, rounds alternate direct / refine so both see the same machine state; each
round sends `requests` streaming completions with a fixed output length. Reported: throughput (output
tokens/s), p50/p95 end-to-end latency and p50 time to first token, and refine/direct ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
from streams import timed_stream


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    timed = await timed_stream(client, f"{url}/v1/completions", body)
    return timed.ended - timed.started, timed.ttft_s if timed.arrivals else 0.0, len(timed.arrivals)


async def one_round(client: httpx.AsyncClient, url: str, body: dict, concurrency: int, requests: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int):
        async with gate:
            return await one_request(client, url, {**body, "seed": i})

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "throughput_tok_s": sum(r[2] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "ttft_p50_s": statistics.median(r[1] for r in results),
    }


def median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--engine", default="http://127.0.0.1:8100")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = ap.parse_args()

    body = {
        "model": args.model,
        "prompt": "Write a short story about a lighthouse keeper.",
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
    }
    report = {
        "command": "bench/overhead.py " + " ".join(f"--concurrency {c}" for c in args.concurrency),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "levels": [],
    }
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_round(client, args.engine, body, 2, 4)  # warm-up, not reported
        await one_round(client, args.refine, body, 2, 4)
        for c in args.concurrency:
            requests = max(8, 2 * c)
            direct, proxied = [], []
            for _ in range(args.rounds):
                direct.append(await one_round(client, args.engine, body, c, requests))
                proxied.append(await one_round(client, args.refine, body, c, requests))
            d, r = median_of(direct), median_of(proxied)
            ratios = {k: r[k] / d[k] for k in d}
            report["levels"].append(
                {
                    "concurrency": c,
                    "requests_per_round": requests,
                    "direct": d,
                    "refine": r,
                    "ratio_refine_over_direct": ratios,
                }
            )
            print(
                f"c={c:3d}  direct {d['throughput_tok_s']:7.1f} tok/s p50 {d['p50_s']:.3f}s p95 {d['p95_s']:.3f}s "
                f"ttft {d['ttft_p50_s'] * 1000:.0f}ms | refine {r['throughput_tok_s']:7.1f} tok/s "
                f"p50 {r['p50_s']:.3f}s p95 {r['p95_s']:.3f}s ttft {r['ttft_p50_s'] * 1000:.0f}ms | "
                f"ratio tput {ratios['throughput_tok_s']:.3f} p50 {ratios['p50_s']:.3f} "
                f"p95 {ratios['p95_s']:.3f} ttft {ratios['ttft_p50_s']:.3f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
