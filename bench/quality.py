"""Quality harness: a small task suite with verifiable answers, run through refine with any policy.

    .venv/bin/python bench/quality.py --policy none
    .venv/bin/python bench/quality.py --policy srgen --params '{"max_corrections": 4}'

Each item is one chat request (greedy unless --temperature is given). Reported: accuracy with a 95% Wilson
interval, overall and per category, completion tokens and latency per item. Per-item results go to
bench/results/quality-<policy>.jsonl so two runs can be compared item by item.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import time
from pathlib import Path

from openai import AsyncOpenAI

TASKS = Path(__file__).parent / "tasks" / "quality.jsonl"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def is_correct(item: dict, output: str) -> bool:
    """Number: the last number in the output. Choice: the first standalone option letter. Text: a whole word."""
    if item["kind"] == "number":
        numbers = _NUMBER.findall(output)
        return bool(numbers) and math.isclose(float(numbers[-1].replace(",", "")), float(item["answer"]),
                                              rel_tol=1e-6, abs_tol=1e-9)
    if item["kind"] == "choice":
        letter = re.search(r"\b([A-D])\b", output)
        return bool(letter) and letter.group(1) == item["answer"]
    accepted = [item["answer"], *item.get("aliases", [])]
    return any(re.search(rf"\b{re.escape(a)}\b", output, re.I) for a in accepted)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


async def run_item(client: AsyncOpenAI, args, refine: dict, item: dict) -> dict:
    started = time.perf_counter()
    resp = await client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": item["question"]}],
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        extra_body={"refine": refine},
    )
    output = resp.choices[0].message.content or ""
    return {
        "id": item["id"], "category": item["category"], "correct": is_correct(item, output),
        "output": output, "completion_tokens": resp.usage.completion_tokens,
        "latency_s": time.perf_counter() - started, "trace": (resp.model_extra or {}).get("refine", {}).get("trace"),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--policy", default="none")
    ap.add_argument("--params", default="{}", help="policy parameters as a JSON object")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    ap.add_argument("--stride", type=int, default=1, help="every k-th item (4: 20 items, 5 per category)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    items = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    items = items[:: args.stride]
    items = items[: args.limit] if args.limit else items
    refine = {"policy": args.policy, **json.loads(args.params)}
    client = AsyncOpenAI(base_url=f"{args.refine}/v1", api_key="unused", timeout=600, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)

    async def bounded(item: dict) -> dict:
        async with gate:
            return await run_item(client, args, refine, item)

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in items))
    wall = time.perf_counter() - started

    out = args.out or Path(__file__).parent / "results" / f"quality-{args.policy}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))

    def line(name: str, rows: list[dict]) -> str:
        k, n = sum(r["correct"] for r in rows), len(rows)
        lo, hi = wilson(k, n)
        return f"{name:12s} {k:3d}/{n:<3d} = {k / n:6.1%}  (95% CI {lo:.1%}-{hi:.1%})"

    print(f"policy={args.policy} params={args.params} items={len(results)} wall={wall:.1f}s")
    for category in sorted({r["category"] for r in results}):
        print(line(category, [r for r in results if r["category"] == category]))
    print(line("overall", results))
    print(f"completion tokens/item: mean {statistics.mean(r['completion_tokens'] for r in results):.1f}; "
          f"latency/item: median {statistics.median(r['latency_s'] for r in results):.2f}s "
          f"(concurrency {args.concurrency}); per-item results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
