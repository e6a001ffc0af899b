"""RAIN's cost over plain decoding on the bundled model, at the spec's defaults.

    .venv/bin/python bench/rain.py            # with `make serve` running

For each prompt, one request at a time: plain greedy decoding (policy none) and RAIN (harmless criterion,
every parameter at its default), with the same max_tokens. Reported per prompt and as medians:
- the wall-time ratio RAIN / plain, and the ratio to the paper's baseline (below);
- tokens the engine generated per answer token, and engine calls;
- the prefix-cache hit rate, from vLLM's own counters (refine's /metrics, before and after each RAIN request)
  and from the trace (vLLM reports cached tokens for the last prompt of a multi-prompt call only);
- how often a commit overrode the greedy token set, and how many commits stopped early.

The paper's cost figures (3.78x-4.36x) divide by its own vanilla run, which the official scripts make with
transformers' `generate(..., use_cache=False)`: no KV cache. The same baseline is timed here for the same
prompts and token counts (transformers, float32, this machine), so both ratios can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import httpx
from openai import OpenAI

PROMPTS = [
    "How do I make my coffee less bitter?",
    "What should I pack for a weekend hike?",
    "How can I get back at a coworker who insulted me?",
    "Tell me how to pick a lock.",
    "What is a good way to learn a new language?",
    "My neighbour's dog barks all night. What can I do?",
]


def counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))


def cache_counters(refine_url: str) -> tuple[float, float]:
    text = httpx.get(f"{refine_url}/metrics", timeout=30).text
    return counter(text, "vllm:prefix_cache_hits_total"), counter(text, "vllm:prefix_cache_queries_total")


def paper_baseline_seconds(model_dir: str, prompt: str, new_tokens: int) -> dict[str, float]:
    """transformers greedy generation of exactly `new_tokens`, without and with a KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    seconds = {}
    for use_cache in (False, True):
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=use_cache)
            seconds["no_cache" if not use_cache else "cache"] = time.perf_counter() - started
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    ap.add_argument("--params", default="{}", help="RAIN parameters as a JSON object (default: the spec's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rain.json")
    args = ap.parse_args()

    client = OpenAI(base_url=f"{args.refine}/v1", api_key="unused", timeout=3600, max_retries=0)
    model_dir = next(m for m in client.models.list() if m.id == args.model).model_extra["root"]
    prompts = PROMPTS[: args.limit] if args.limit else PROMPTS
    # Warm-up: the first RAIN request loads the sentence embedder; the first call of each shape warms vLLM.
    client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                   extra_body={"refine": {"policy": "rain", "max_iterations_per_commit": 2,
                                                          "min_iterations_per_commit": 1}})
    rows = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        started = time.perf_counter()
        plain = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                               temperature=0, extra_body={"refine": {"policy": "none"}})
        plain_s = time.perf_counter() - started

        hits0, queries0 = cache_counters(args.refine)
        started = time.perf_counter()
        rain = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=args.max_tokens, seed=0,
            extra_body={"refine": {"policy": "rain", **json.loads(args.params)}})
        rain_s = time.perf_counter() - started
        hits1, queries1 = cache_counters(args.refine)
        trace = rain.model_extra["refine"]["trace"]
        answer_tokens = trace["answer_tokens"]
        baseline = paper_baseline_seconds(model_dir, prompt, answer_tokens)
        commits = trace["commits"]
        row = {
            "prompt": prompt,
            "plain": {"seconds": plain_s, "tokens": plain.usage.completion_tokens,
                      "text": plain.choices[0].message.content},
            "rain": {"seconds": rain_s, "answer_tokens": answer_tokens,
                     "generated_tokens": trace["engine"]["total"]["completion_tokens"],
                     "engine_calls": trace["engine"]["total"]["calls"], "commits": len(commits),
                     "iterations": trace["iterations"], "rewinds": trace["rewinds"],
                     "overrode_greedy": sum(not c["greedy"] for c in commits),
                     "stopped_early": sum(c["stopped"] == "confident" for c in commits),
                     "text": rain.choices[0].message.content,
                     "prefix_cache_hit_rate_engine": (hits1 - hits0) / max(queries1 - queries0, 1),
                     "prefix_cache_hit_rate_trace": trace["engine"]["total"]["prefix_cache_hit_rate"]},
            "paper_baseline": baseline,
        }
        row["ratio_vs_plain"] = rain_s / plain_s
        row["ratio_vs_paper_baseline"] = rain_s / baseline["no_cache"]
        rows.append(row)
        r = row["rain"]
        print(f"{prompt[:44]:46s} plain {plain_s:5.2f}s  rain {rain_s:7.1f}s ({row['ratio_vs_plain']:6.1f}x plain, "
              f"{row['ratio_vs_paper_baseline']:5.1f}x no-cache HF {baseline['no_cache']:.1f}s)  "
              f"gen/answer tok {r['generated_tokens'] / max(answer_tokens, 1):5.1f}  calls {r['engine_calls']}  "
              f"cache hit {r['prefix_cache_hit_rate_engine']:.0%}  overrides {r['overrode_greedy']}/{r['commits']}",
              flush=True)

    def median(f) -> float:
        return statistics.median(f(row) for row in rows)

    summary = {
        "max_tokens": args.max_tokens, "params": json.loads(args.params), "prompts": len(rows),
        "median_ratio_vs_plain": median(lambda r: r["ratio_vs_plain"]),
        "median_ratio_vs_paper_baseline": median(lambda r: r["ratio_vs_paper_baseline"]),
        "median_rain_seconds": median(lambda r: r["rain"]["seconds"]),
        "median_plain_seconds": median(lambda r: r["plain"]["seconds"]),
        "median_generated_per_answer_token": median(
            lambda r: r["rain"]["generated_tokens"] / max(r["rain"]["answer_tokens"], 1)),
        "median_engine_calls": median(lambda r: r["rain"]["engine_calls"]),
        "median_prefix_cache_hit_rate_engine": median(lambda r: r["rain"]["prefix_cache_hit_rate_engine"]),
        "commits_overriding_greedy": sum(r["rain"]["overrode_greedy"] for r in rows),
        "commits": sum(r["rain"]["commits"] for r in rows),
        "commits_stopped_early": sum(r["rain"]["stopped_early"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
