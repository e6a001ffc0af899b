"""SRGen's cost inside the engine, against policy `none`, on the server `make serve` starts.

    .venv/bin/python bench/srgen.py

1. wall time and tokens/s of the same requests (fixed length: 128 tokens, ignore_eos) with `none`, with `srgen`
   at the spec's defaults (T=0.6), and with `srgen` forced to correct the first 6 tokens of every request (the
   official analysis counts about 6 triggers per task), at 1 and 8 concurrent requests; medians of
   `--rounds` alternating rounds;
2. the cost of one correction (from the engine's own timing in the trace) against one decode step
   (the median inter-token gap of a lone plain stream);
3. what a plain request pays while it shares the batch with an SRGen request that corrects often:
   its inter-token gaps alone and co-batched;
4. the stall bound: a plain stream co-batched with 8 SRGen requests that all correct at each of their first 16
   tokens, so up to 8 rows trigger in one step. Run it against servers started with different
   `--srgen-engine.max-rows-per-step` (`--stall-only --label rows4`) to see how the per-step limit bounds the stall.
Accuracy with and without SRGen comes from bench/quality.py (--policy srgen / none).
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

TASKS = Path(__file__).parent / "tasks" / "suite-dev.jsonl"
FORCE = {"warmup_threshold": 0.0, "min_threshold": 0.0}


async def chat(
    client: httpx.AsyncClient, args, question: str, refine: dict, seed: int, max_tokens: int, stream: bool = False
) -> dict:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "seed": seed,
        "refine": refine,
        "stream": stream,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    if not stream:
        resp = (await client.post(f"{args.refine}/v1/chat/completions", json=body)).raise_for_status().json()
        return {
            "wall_s": time.perf_counter() - started,
            "tokens": resp["usage"]["completion_tokens"],
            "trace": resp["refine"]["trace"],
        }
    timed = await timed_stream(client, f"{args.refine}/v1/chat/completions", body)
    return {"wall_s": timed.ended - started, "gaps": timed.gaps_s, "trace": timed.trace}


async def throughput(client, args, refine: dict, questions: list[str], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, q: str):
        async with gate:
            return await chat(client, args, q, refine, seed=i, max_tokens=args.max_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    corrections = [c for r in results for c in (r["trace"].get("corrections") or [])]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "corrections": len(corrections)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "srgen.json")
    ap.add_argument(
        "--stall-only", action="store_true", help="only measurement 4, written to results/srgen_stall_LABEL.json"
    )
    ap.add_argument("--label", default="default", help="names the server configuration in the stall report")
    args = ap.parse_args()
    if args.stall_only:
        await stall_report(args)
        return

    lines = TASKS.read_text().splitlines()
    questions = [json.loads(line)["question"] for line in lines][:: max(1, len(lines) // args.requests)]
    questions = [q + " Explain your reasoning." for q in questions[: args.requests]]
    report: dict = {
        "command": "bench/srgen.py",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "requests": len(questions),
    }
    srgen = {"policy": "srgen"}
    async with httpx.AsyncClient(timeout=1200) as client:
        await throughput(client, args, {"policy": "none"}, questions[:2], 2)  # warm-up
        await throughput(client, args, srgen, questions[:2], 2)
        configs = {
            "none": {"policy": "none"},
            "srgen": srgen,
            "srgen_6_forced": {"policy": "srgen", "max_corrections": 6, **FORCE},
        }
        for concurrency in (1, 8):
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, refine in configs.items():
                    runs[name].append(await throughput(client, args, refine, questions, concurrency))
            level = {
                name: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "tokens_per_s")}
                | {"corrections_per_request": statistics.median(r["corrections"] for r in rs) / len(questions)}
                for name, rs in runs.items()
            }
            for name in ("srgen", "srgen_6_forced"):
                level[name]["wall_ratio_vs_none"] = level[name]["wall_s"] / level["none"]["wall_s"]
            report[f"concurrency_{concurrency}"] = level
            print(
                f"c={concurrency}: "
                + " | ".join(
                    f"{name} {v['wall_s']:.1f}s {v['tokens_per_s']:.1f} tok/s "
                    f"{v['corrections_per_request']:.2f} corr/req"
                    + (f" wall x{v['wall_ratio_vs_none']:.3f}" if "wall_ratio_vs_none" in v else "")
                    for name, v in level.items()
                ),
                flush=True,
            )

        # One decode step vs one correction.
        alone = await chat(client, args, questions[0], {"policy": "none"}, 0, args.max_tokens, stream=True)
        step_s = statistics.median(alone["gaps"])
        forced = await chat(
            client, args, questions[1], {"policy": "srgen", "max_corrections": 8, **FORCE}, 0, args.max_tokens
        )
        correction_s = statistics.median(c["seconds"] for c in forced["trace"]["corrections"])
        report["decode_step_s"], report["correction_s"] = step_s, correction_s
        print(
            f"one decode step {step_s * 1000:.1f} ms (median, lone stream); one correction "
            f"{correction_s * 1000:.0f} ms (median of 8, context ~{forced['tokens']}+prompt) = "
            f"{correction_s / step_s:.1f} decode steps",
            flush=True,
        )

        # A plain stream co-batched with an SRGen request that corrects at each of its first 16 tokens.
        together = await asyncio.gather(
            chat(client, args, questions[0], {"policy": "none"}, 0, args.max_tokens, stream=True),
            chat(client, args, questions[1], {"policy": "srgen", "max_corrections": 16, **FORCE}, 0, args.max_tokens),
        )
        gaps = together[0]["gaps"]
        report["cobatched"] = {
            "alone_gap_p50_s": step_s,
            "alone_gap_max_s": max(alone["gaps"]),
            "cobatched_gap_p50_s": statistics.median(gaps),
            "cobatched_gap_max_s": max(gaps),
            "cobatched_wall_s": together[0]["wall_s"],
            "alone_wall_s": alone["wall_s"],
        }
        print(
            f"plain stream alone: gap p50 {step_s * 1000:.1f} ms, max {max(alone['gaps']) * 1000:.0f} ms, "
            f"wall {alone['wall_s']:.1f}s | co-batched with a correcting SRGen request: gap p50 "
            f"{statistics.median(gaps) * 1000:.1f} ms, max {max(gaps) * 1000:.0f} ms, "
            f"wall {together[0]['wall_s']:.1f}s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


async def stall_report(args) -> None:
    questions = [json.loads(line)["question"] for line in TASKS.read_text().splitlines()][:9]
    forced = {"policy": "srgen", "max_corrections": 16, **FORCE}
    async with httpx.AsyncClient(timeout=1200) as client:
        await chat(client, args, questions[0], {"policy": "none"}, 0, 8)  # warm-up
        alone = await chat(client, args, questions[0], {"policy": "none"}, 0, 64, stream=True)
        together = await asyncio.gather(
            chat(client, args, questions[0], {"policy": "none"}, 0, 64, stream=True),
            *(chat(client, args, q, forced, i, 32) for i, q in enumerate(questions[1:])),
        )
    gaps = together[0]["gaps"]
    skipped = sum(len(r["trace"].get("skipped") or []) for r in together[1:])
    corrections = [c for r in together[1:] for c in (r["trace"].get("corrections") or [])]
    report = {
        "command": f"bench/srgen.py --stall-only --label {args.label}",
        "label": args.label,
        "alone_gap_p50_s": statistics.median(alone["gaps"]),
        "alone_gap_max_s": max(alone["gaps"]),
        "cobatched_gap_p50_s": statistics.median(gaps),
        "cobatched_gap_max_s": max(gaps),
        "corrections": len(corrections),
        "max_batch_rows": max((c["batch_rows"] for c in corrections), default=0),
        "skipped_by_the_limit": skipped,
    }
    print(json.dumps(report, indent=2))
    out = args.out.parent / f"srgen_stall_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
