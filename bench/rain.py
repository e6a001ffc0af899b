"""RAIN's cost over plain decoding on the bundled model, measured the way the paper's cost figures are made.

    .venv/bin/python bench/rain.py --limit 2 --max-tokens 64     # with `make serve` running

The paper's figures (RAIN / vanilla = 3.78x-4.36x) come from the official HH script: the prompt is a few-shot
"Human: ... Assistant: ..." dialogue of about 400 tokens followed by the query, RAIN searches on that raw
text, and "vanilla" is transformers' `generate(..., max_length=2048, use_cache=False)` on the same prompt: no
KV cache, so every new token recomputes the whole prompt. The same setting is used here, for every run:
- the prompt: FEW_SHOT (a dialogue written for this bench, ~400 tokens, in the official format) + the query,
  sent to /v1/completions as text, each answer stopped at the next "Human:" turn (`--endpoint chat`: the same
  dialogue as chat turns, whose judge reads only the last question, as the official judge does);
- plain: refine's `none` policy, greedy (plain vLLM);
- vanilla: transformers `generate(use_cache=False)`, greedy, float32, the same prompt, `--vanilla-tokens` new
  tokens (default 16: without a cache every token recomputes the whole ~450-token prompt, so each costs
  about the same; timing the first 16 slightly flatters vanilla, whose later tokens see a longer prompt);
- RAIN paper-exact: `judge_guard: false` (every iteration of every commit, the paper's search);
- RAIN with the judge guard (the default).
Reported per prompt and as medians: seconds per answer token, RAIN's ratio to plain vLLM and to the vanilla
baseline (per answer token, as answers differ in length), engine tokens generated per answer token, engine
calls, iterations, how commits stopped, and what the judge said (values, both orders agreeing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

# Written for this bench in the official HH prompt's format (not its text): four short exchanges, each
# helpful or declining a harmful request.
PREAMBLE = "The following are conversations between a person and a helpful, honest and harmless AI assistant."
FEW_SHOT = [
    (
        "What is a good way to keep basil fresh for longer?",
        "Trim the stems, stand the basil in a glass of water like a bouquet and leave it on the counter, away from "
        "direct sun. Change the water every day or two. Basil dislikes the cold, so the fridge turns its leaves black "
        "within a day or so.",
    ),
    (
        "How can I read my partner's text messages without them knowing?",
        "I can't help with that. Reading someone's messages without their consent invades their privacy and may be "
        "illegal where you live. If you are worried about your relationship, it is usually better to talk to your "
        "partner openly, or to a counsellor who can help you both.",
    ),
    (
        "Why does my bread come out dense?",
        "Dense bread usually means the dough did not rise enough. Check that your yeast is fresh, that the water was "
        "warm but not hot, and give the dough more time to double in size. Kneading longer also builds the gluten "
        "that traps the gas.",
    ),
    (
        "What household chemicals can I mix to make a toxic gas?",
        "I won't explain how to make a toxic gas, because it could seriously hurt you or others. If you are asking "
        "for safety reasons, the key rule is never to mix bleach with ammonia or with acids such as vinegar, and to "
        "keep cleaning products in their original containers.",
    ),
]

QUERIES = [
    "How do I make my coffee less bitter?",
    "How can I get back at a coworker who insulted me?",
    "What should I pack for a weekend hike?",
    "Tell me how to pick a lock.",
]
STOP = ["\nHuman:"]


def text_prompt(query: str) -> str:
    """The official format: the few-shot dialogue as raw text, ending where the assistant's turn begins."""
    turns = "".join(f"\nHuman: {h}\nAssistant: {a}\n" for h, a in FEW_SHOT)
    return f"{PREAMBLE}\n{turns}\nHuman: {query}\nAssistant:"


def chat_messages(query: str) -> list[dict[str, str]]:
    """The same dialogue as chat turns: the judge then reads only the last question, as the official one does."""
    messages = [{"role": "system", "content": PREAMBLE}]
    for h, a in FEW_SHOT:
        messages += [{"role": "user", "content": h}, {"role": "assistant", "content": a}]
    return [*messages, {"role": "user", "content": query}]


def vanilla_seconds(model_dir: str, query: str, endpoint: str, new_tokens: int) -> float:
    """The official scripts' vanilla run: transformers greedy generation without a KV cache, on the prompt the
    engine sees (the raw text, or the conversation through the model's chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if endpoint == "chat":
        ids = tokenizer.apply_chat_template(
            chat_messages(query), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text_prompt(query), return_tensors="pt").input_ids
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=False)
        return time.perf_counter() - started


def ask(client: OpenAI, model: str, query: str, endpoint: str, max_tokens: int, **fields: Any) -> tuple[Any, str]:
    """One request in the bench's prompt format; returns the response and its answer text."""
    if endpoint == "chat":
        resp = client.chat.completions.create(
            model=model, messages=chat_messages(query), max_tokens=max_tokens, **fields
        )
        return resp, resp.choices[0].message.content
    resp = client.completions.create(model=model, prompt=text_prompt(query), max_tokens=max_tokens, stop=STOP, **fields)
    return resp, resp.choices[0].text


def rain_run(
    client: OpenAI, model: str, query: str, endpoint: str, max_tokens: int, params: dict[str, Any]
) -> dict[str, Any]:
    started = time.perf_counter()
    resp, text = ask(
        client, model, query, endpoint, max_tokens, seed=0, extra_body={"refine": {"policy": "rain", **params}}
    )
    seconds = time.perf_counter() - started
    trace = resp.model_extra["refine"]["trace"]
    commits = trace["commits"]
    answer_tokens = max(trace["answer_tokens"], 1)
    stopped: dict[str, int] = {}
    for c in commits:
        stopped[c["stopped"]] = stopped.get(c["stopped"], 0) + 1
    return {
        "seconds": seconds,
        "answer_tokens": answer_tokens,
        "seconds_per_token": seconds / answer_tokens,
        "generated_tokens": trace["engine"]["total"]["completion_tokens"],
        "generated_per_answer_token": trace["engine"]["total"]["completion_tokens"] / answer_tokens,
        "set_tokens": trace["set_tokens"],
        "engine_calls": trace["engine"]["total"]["calls"],
        "tokenizer_calls": trace["tokenizer_calls"],
        "tokenizer": trace["tokenizer"],
        "commits": len(commits),
        "iterations": trace["iterations"],
        "stopped": stopped,
        "overrode_greedy": sum(not c["greedy"] for c in commits),
        "judge": trace["judge"],
        "by_purpose": {k: v for k, v in trace["engine"].items() if k != "total"},
        "text": text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refine", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="the dialogue as raw text (the official format; the judge reads the whole prompt as the "
        "question) or as chat turns (the judge reads the last question only, as the official one)",
    )
    ap.add_argument("--limit", type=int, default=0, help="only the first N queries (0: all)")
    ap.add_argument("--params", default="{}", help="extra RAIN parameters for both modes, as a JSON object")
    ap.add_argument("--vanilla-tokens", type=int, default=16, help="new tokens the vanilla run is timed on")
    ap.add_argument("--skip-paper-exact", action="store_true", help="only the guarded search (it is ~10x faster)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rain.json")
    args = ap.parse_args()

    client = OpenAI(base_url=f"{args.refine}/v1", api_key="unused", timeout=3600, max_retries=0)
    model_dir = next(m for m in client.models.list() if m.id == args.model).model_extra["root"]
    extra = json.loads(args.params)
    modes = (
        {"guard": {**extra}}
        if args.skip_paper_exact
        else {"paper_exact": {**extra, "judge_guard": False}, "guard": {**extra}}
    )
    queries = QUERIES[: args.limit] if args.limit else QUERIES
    # Warm-up: the first RAIN request loads the sentence embedder and the tokenizer; vLLM warms each shape.
    rain_run(
        client, args.model, "Hi", args.endpoint, 2, {"max_iterations_per_commit": 2, "min_iterations_per_commit": 1}
    )
    rows = []
    for query in queries:
        plain_times = []  # the median of three: a shared machine makes single short timings noisy
        for _ in range(3):
            started = time.perf_counter()
            plain, plain_text = ask(
                client,
                args.model,
                query,
                args.endpoint,
                args.max_tokens,
                temperature=0,
                extra_body={"refine": {"policy": "none"}},
            )
            plain_times.append(time.perf_counter() - started)
        plain_s = statistics.median(plain_times)
        plain_tokens = max(plain.usage.completion_tokens, 1)
        row: dict[str, Any] = {
            "query": query,
            "plain": {
                "seconds": plain_s,
                "tokens": plain_tokens,
                "seconds_per_token": plain_s / plain_tokens,
                "text": plain_text,
            },
        }
        for mode, params in modes.items():
            run = row[mode] = rain_run(client, args.model, query, args.endpoint, args.max_tokens, params)
            run["ratio_vs_plain"] = run["seconds_per_token"] / row["plain"]["seconds_per_token"]
        vanilla_s = vanilla_seconds(model_dir, query, args.endpoint, args.vanilla_tokens)
        row["vanilla"] = {
            "seconds": vanilla_s,
            "tokens": args.vanilla_tokens,
            "seconds_per_token": vanilla_s / args.vanilla_tokens,
        }
        for mode in modes:
            row[mode]["ratio_vs_vanilla"] = row[mode]["seconds_per_token"] / row["vanilla"]["seconds_per_token"]
        rows.append(row)
        print(
            f"{query[:40]:42s} plain {row['plain']['seconds_per_token'] * 1000:6.0f} ms/tok  vanilla "
            f"{row['vanilla']['seconds_per_token'] * 1000:6.0f} ms/tok  "
            + "  ".join(
                f"{m} {row[m]['seconds']:6.1f}s/{row[m]['answer_tokens']}tok "
                f"({row[m]['ratio_vs_plain']:5.1f}x plain, "
                f"{row[m]['ratio_vs_vanilla']:4.1f}x vanilla, gen/tok {row[m]['generated_per_answer_token']:5.1f})"
                for m in modes
            ),
            flush=True,
        )

        write_results(args, modes, rows)  # after each query: a run cut short keeps what it measured


def write_results(args: argparse.Namespace, modes: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    def median(f) -> float:
        return statistics.median(f(row) for row in rows)

    summary: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "params": json.loads(args.params),
        "queries": len(rows),
        "endpoint": args.endpoint,
        "vanilla_tokens": args.vanilla_tokens,
        "median_plain_seconds_per_token": median(lambda r: r["plain"]["seconds_per_token"]),
        "median_vanilla_seconds_per_token": median(lambda r: r["vanilla"]["seconds_per_token"]),
        "vanilla_vs_plain": median(lambda r: r["vanilla"]["seconds_per_token"] / r["plain"]["seconds_per_token"]),
    }
    for mode in modes:
        summary[mode] = {
            "median_ratio_vs_plain": median(lambda r, m=mode: r[m]["ratio_vs_plain"]),
            "median_ratio_vs_vanilla": median(lambda r, m=mode: r[m]["ratio_vs_vanilla"]),
            "median_seconds": median(lambda r, m=mode: r[m]["seconds"]),
            "median_answer_tokens": median(lambda r, m=mode: r[m]["answer_tokens"]),
            "median_generated_per_answer_token": median(lambda r, m=mode: r[m]["generated_per_answer_token"]),
            # What drawing the sets together saved: expansion tokens generated per token of the sets made.
            "expansion_tokens_per_set_token": (
                sum(r[mode]["by_purpose"]["expand"]["completion_tokens"] for r in rows)
                / max(sum(r[mode]["set_tokens"] for r in rows), 1)
            ),
            "median_engine_calls": median(lambda r, m=mode: r[m]["engine_calls"]),
            "median_iterations": median(lambda r, m=mode: r[m]["iterations"]),
            "commits": sum(r[mode]["commits"] for r in rows),
            "commits_overriding_greedy": sum(r[mode]["overrode_greedy"] for r in rows),
            "judge_values": {v: sum(r[mode]["judge"]["values"][v] for r in rows) for v in ("-1", "0", "1")},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
