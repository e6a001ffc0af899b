"""CyberV's two sensor sources on the same samples: the engine's token statistics (refine's plugin) against the
API's top_logprobs.

    .venv/bin/python bench/cyberv.py --limit 16          # against `make serve` (embedded: it has the plugin)

Each item runs twice with the same seed and all n candidates drawn (`adaptive: false`), once with the default
sensor (the engine's) and once with `sensor: top_logprobs`, one request at a time (`--concurrency 1`): the
sensor changes what is measured, not what is drawn, but a CPU engine's bf16 numerics depend on what else is
in the batch, so concurrent runs would draw other samples. Agreement is counted over the items whose candidates
gave the same answers both times (the same samples), so every difference there is the sensor's: the signals
(s1, s4: probability and margin of the answer's tokens), the spike the feedback round quotes (the
highest-entropy token: over the whole vocabulary, or over the top 5 renormalised) and through them the
decision. Reported: how often the decision and the chosen answer agree, how often the spikes agree, the
feedback rate and the median latency of each source. Results: bench/results/cyberv-sensor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent


async def ask(client: httpx.AsyncClient, args: argparse.Namespace, item: dict, sensor: str) -> dict:
    refine = {
        "policy": "cyberv",
        "n": args.n,
        "adaptive": False,
        "sensor": sensor,
        "max_reasoning_tokens": args.max_tokens,
    }
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": item["question"]}],
        "seed": args.seed,
        "refine": refine,
    }
    started = time.perf_counter()
    resp = (await client.post(f"{args.refine}/v1/chat/completions", json=body)).raise_for_status()
    trace = resp.json()["refine"]["trace"]
    return {
        "seconds": time.perf_counter() - started,
        "trace": trace,
        "decision": (trace["decision"], trace["chosen"]["answer"]),
        "spikes": [c["spike"]["offset"] if c["spike"] else None for c in trace["candidates"]],
        "answers": [c["answer"] for c in trace["candidates"]],
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--limit", type=int, default=40, help="an even spread of N items")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()

    items = [json.loads(line) for line in (HERE / "tasks" / f"suite-{args.split}.jsonl").read_text().splitlines()]
    items = items[:: max(1, len(items) // args.limit)][: args.limit]
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=3600) as client:

        async def both(item: dict) -> dict:
            async with gate:
                engine = await ask(client, args, item, "auto")
                api = await ask(client, args, item, "top_logprobs")
            assert engine["trace"]["sensor_source"] == "engine", "this upstream has no engine sensor"
            return {"id": item["id"], "engine": engine, "top_logprobs": api}

        rows = await asyncio.gather(*(both(item) for item in items))

    same_samples = [r for r in rows if r["engine"]["answers"] == r["top_logprobs"]["answers"]]
    spikes = [(a, b) for r in same_samples for a, b in zip(r["engine"]["spikes"], r["top_logprobs"]["spikes"])]
    summary = {
        "command": f"bench/cyberv.py --split {args.split} --limit {args.limit} --n {args.n} "
        f"--concurrency {args.concurrency}",
        "items": len(rows),
        "items_with_identical_candidate_answers": len(same_samples),
        "same_decision_and_answer": statistics.mean(
            r["engine"]["decision"] == r["top_logprobs"]["decision"] for r in same_samples
        )
        if same_samples
        else None,
        "same_spike_token": statistics.mean(a == b for a, b in spikes) if spikes else None,
        "feedback_rate": {
            s: statistics.mean(r[s]["trace"]["feedback"] is not None for r in rows) for s in ("engine", "top_logprobs")
        },
        "median_seconds": {s: statistics.median(r[s]["seconds"] for r in rows) for s in ("engine", "top_logprobs")},
    }
    out = HERE / "results" / "cyberv-sensor.json"
    out.write_text(
        json.dumps(
            {
                "summary": summary,
                "rows": [
                    {
                        "id": r["id"],
                        **{
                            s: {k: r[s][k] for k in ("seconds", "decision", "spikes", "answers")}
                            for s in ("engine", "top_logprobs")
                        },
                    }
                    for r in rows
                ],
            },
            indent=1,
        )
        + "\n"
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
