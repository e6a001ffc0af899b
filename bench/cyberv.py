"""CyberV against `none` and against plain majority voting over the same N candidates, on the quality suite.

    .venv/bin/python bench/cyberv.py --limit 40 --n 4

Each item runs once with `none` (greedy) and once with `cyberv`. Majority voting needs no extra run: cyberv's
trace lists the answers of all N round-1 candidates, so the majority answer of exactly those samples is scored
too (ties go to the answer seen first, the direct answer's when it is among them), with round 1's tokens and
cyberv's latency less its feedback round as its cost. Reported: accuracy with 95% Wilson intervals,
completion tokens and median latency per item, cyberv's trigger rate and how often a feedback answer was kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from openai import AsyncOpenAI
from quality import TASKS, is_correct, wilson


async def ask(client: AsyncOpenAI, args, item: dict, refine: dict) -> dict:
    started = time.perf_counter()
    resp = await client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": item["question"]}], max_tokens=args.max_tokens,
        temperature=0, seed=args.seed, extra_body={"refine": refine},
    )
    output = resp.choices[0].message.content or ""
    return {"correct": is_correct(item, output), "tokens": resp.usage.completion_tokens,
            "latency_s": time.perf_counter() - started, "trace": resp.model_extra["refine"]["trace"]}


def majority(trace: dict) -> tuple[str | None, int]:
    """The most common round-1 answer (first seen wins a tie) and round 1's completion tokens."""
    answers = [c["answer"] for c in trace["candidates"] if c["answer"] is not None]
    top = Counter(answers).most_common(1)[0][0] if answers else None
    return top, trace["rounds"]["round1"]["completion_tokens"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--theta", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=40, help="first N items, spread over the categories")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cyberv.json")
    args = ap.parse_args()

    items = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    items = items[:: max(1, len(items) // args.limit)][: args.limit]  # every k-th item: all categories
    cyberv = {"policy": "cyberv", "n": args.n, "theta": args.theta, "max_reasoning_tokens": args.max_tokens}
    client = AsyncOpenAI(base_url=f"{args.refine}/v1", api_key="unused", timeout=1800, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)

    async def both(item: dict) -> dict:
        async with gate:
            plain = await ask(client, args, item, {"policy": "none"})
            loop = await ask(client, args, item, cyberv)
        vote, vote_tokens = majority(loop["trace"])
        feedback = loop["trace"]["feedback"]
        return {
            "id": item["id"], "none": plain, "cyberv": loop,
            "majority": {"correct": vote is not None and is_correct(item, vote), "tokens": vote_tokens,
                         "latency_s": loop["latency_s"] - (feedback["seconds"] if feedback else 0.0)},
            "triggered": feedback is not None, "feedback_kept": bool(feedback and feedback["accepted"]),
        }

    started = time.perf_counter()
    rows = await asyncio.gather(*(both(i) for i in items))
    wall = time.perf_counter() - started

    summary = {"command": f"bench/cyberv.py --limit {args.limit} --n {args.n} --theta {args.theta}",
               "items": len(rows), "wall_s": wall}
    print(f"{len(rows)} items, cyberv n={args.n} theta={args.theta}, greedy baseline; wall {wall:.0f}s")
    for name in ("none", "majority", "cyberv"):
        k = sum(r[name]["correct"] for r in rows)
        lo, hi = wilson(k, len(rows))
        tokens = statistics.mean(r[name]["tokens"] for r in rows)
        latency = statistics.median(r[name]["latency_s"] for r in rows)
        summary[name] = {"correct": k, "accuracy": k / len(rows), "ci95": [lo, hi], "tokens_per_item": tokens,
                         "latency_median_s": latency}
        print(f"{name:9s} {k:3d}/{len(rows)} = {k / len(rows):6.1%} (95% CI {lo:.1%}-{hi:.1%})  "
              f"tokens/item {tokens:6.1f}  latency/item {latency:6.2f}s")
    triggered = sum(r["triggered"] for r in rows)
    kept = sum(r["feedback_kept"] for r in rows)
    summary["trigger_rate"], summary["feedback_kept"] = triggered / len(rows), kept
    print(f"trigger rate {triggered}/{len(rows)} = {triggered / len(rows):.1%}; feedback answer kept in {kept}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
