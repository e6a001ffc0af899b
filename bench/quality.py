"""Quality on the held-out suite (bench/suite.py): every arm through refine, graded by one grader, compared
item by item.

    .venv/bin/python bench/quality.py run none                       # greedy, one run
    .venv/bin/python bench/quality.py run srgen
    .venv/bin/python bench/quality.py run cyberv-full --seeds 0 1 2  # sampled: one run per seed
    .venv/bin/python bench/quality.py run rain --limit 40
    .venv/bin/python bench/quality.py run deepconf --seeds 0 1 2     # and self-consistency, cyberv-confstop
    .venv/bin/python bench/quality.py report                         # tables + README section from the runs
    .venv/bin/python bench/quality.py run none --model Qwen2.5-Coder-0.5B-Instruct  # another served model
    .venv/bin/python bench/quality.py report --model Qwen2.5-Coder-0.5B-Instruct

`run` sends each item of the split (`--split test` by default: the frozen one) as one chat request through
refine with the arm's `refine` object (`--model`: the served model, SmolLM2-135M-Instruct by default), and writes
bench/results/quality/<model>/<split>/<arm>-s<seed>.jsonl: per item the returned text, the extracted answer,
whether it is right, the usage and the trace's summary. Every arm is graded by `grading.grade` on the text the
client receives: the same extractor and the same comparison.

`report --model M` reads every run of M on the split and writes bench/results/quality/<M>/<split>.json and, for the
test split, M's table in the README's quality section (between its `quality:<M>:start` / `quality:<M>:end` markers):
- accuracy per arm with a 95% Wilson interval (sampled arms: pooled over seeds, per-seed spread shown);
- each arm against `none`, paired by item: the difference with a 95% paired-bootstrap interval (items
  resampled; a sampled arm's item score is its mean over seeds) and, for single runs, McNemar's exact p;
- from cyberv-full's own samples (the same candidates, no new engine calls): self-consistency (majority of
  the first k candidates' answers, k = 1..n), and the adaptive stopping rule replayed over them
  (`stopping.py`: certain, and at several `stop_risk`s): the tokens it would have drawn, and how often it
  decides as all n do; the same at n = 12 and 16 over rounds pooled from the seeds' candidates (where the
  seeds hold enough of them: 2 seeds for 12, 3 for 16); and, for each
  n, the cheapest thresholds on the forecast that reach 95% the same decision when fitted to the outcomes
  themselves (the in-sample best of this forecast, not a rule: `stopping.fit_thresholds`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from grading import grade, grade_answer
from openai import AsyncOpenAI
from stats import mcnemar, paired_bootstrap, ratio_interval, wilson
from stopping import Replayed, fit_thresholds, forecast_round, pooled_rounds, replay, stop_risk_rule, tokens

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quality"
README = HERE.parent / "README.md"

# arm -> the request's refine object; every arm answers with temperature 0 (its own sampling, if any, inside).
ARMS: dict[str, dict] = {
    "none": {"policy": "none"},
    "srgen": {"policy": "srgen"},
    "cyberv": {"policy": "cyberv", "n": 8},
    "cyberv-full": {"policy": "cyberv", "n": 8, "adaptive": False},
    "rain": {"policy": "rain"},
    # DeepConf online at its defaults, and the same policy as self-consistency: no stop, no consensus stop,
    # every one of its max_traces traces voting once (the issue's comparison: same traces, same grader).
    "deepconf": {"policy": "deepconf"},
    "deepconf-low": {"policy": "deepconf", "variant": "low"},
    "self-consistency": {"policy": "deepconf", "early_stop": False, "vote": "majority", "tau": None},
    "cyberv-confstop": {"policy": "cyberv", "n": 8, "confidence_stop": True, "vote": "confidence"},
    # auto at the model's calibration, escalating to cyberv-full; and its probes: a threshold every measured
    # answer reaches, so the trace holds every signal of the first answer and nothing escalates (what
    # bench/calibrate.py fits on and bench/auto_replay.py replays): CyberV's direct call, the client's request.
    "auto": {"policy": "auto", "escalate": {"policy": "cyberv", "n": 8, "adaptive": False}},
    "auto-probe": {"policy": "auto", "escalate": {"policy": "cyberv", "n": 8, "adaptive": False}, "threshold": -1e9},
    "auto-probe-request": {"policy": "auto", "escalate": {"policy": "srgen"}, "threshold": -1e9},
}
# arms whose answers depend on the seed
SAMPLED = {"cyberv", "cyberv-full", "deepconf", "deepconf-low", "self-consistency", "cyberv-confstop", "auto"}
THETA = 0.3  # cyberv's default gate
STOP_RISKS = (0.0, 0.02, 0.05, 0.1)  # the adaptive rule replayed certain (0), below, at and above the default
POOLED_N = (12, 16)  # rounds larger than the runs' n = 8, joined from the seeds' candidates
SAME_DECISION_TARGET = 0.95  # issue 12's: round 1 decides as all n do on at least this share of item runs


def load_items(split: str) -> list[dict]:
    path = HERE / "tasks" / f"suite-{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- run -------------------------------------------------------------------------------------------------


async def run_arm(args: argparse.Namespace) -> None:
    items = load_items(args.split)
    if args.limit:  # an even spread over the tasks, not the first tasks only
        items = items[:: max(1, len(items) // args.limit)][: args.limit]
    refine = {**ARMS[args.arm], **json.loads(args.params)}
    client = AsyncOpenAI(base_url=f"{args.refine}/v1", api_key="unused", timeout=3600, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(item: dict, seed: int, log: TextIO) -> dict:
        async with gate:
            started = time.perf_counter()
            resp = await client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": item["question"]}],
                max_tokens=args.max_tokens,
                temperature=0,
                seed=seed,
                extra_body={"refine": refine},
            )
        text = resp.choices[0].message.content or ""
        graded = grade(item, text)
        trace = (resp.model_extra or {}).get("refine", {}).get("trace") or {}
        row = {
            "id": item["id"],
            "task": item["task"],
            "correct": graded.correct,
            "answer": graded.answer,
            "text": text,
            "completion_tokens": resp.usage.completion_tokens,
            "latency_s": round(time.perf_counter() - started, 3),
            "trace": trace,
        }
        log.write(json.dumps(row) + "\n")
        log.flush()
        return row

    folder = RESULTS / args.model / args.split
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        started = time.perf_counter()
        out = folder / f"{args.arm}-s{seed}.jsonl"
        # Each finished item is appended here at once: a run that is stopped resumes where it was (long runs
        # on a shared CPU), and the run's file is written only once every item has its row.
        partial = out.with_name(out.name + ".partial")
        done = {r["id"]: r for r in map(json.loads, partial.read_text().splitlines())} if partial.exists() else {}
        with partial.open("a") as log:
            todo = [item for item in interleaved(items) if item["id"] not in done]
            done |= {r["id"]: r for r in await asyncio.gather(*(one(item, seed, log) for item in todo))}
        rows = [done[item["id"]] for item in items]
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        partial.unlink()
        k = sum(r["correct"] for r in rows)
        lo, hi = wilson(k, len(rows))
        print(
            f"{args.arm} seed {seed}: {k}/{len(rows)} = {k / len(rows):.1%} (95% CI {lo:.1%}-{hi:.1%}), "
            f"{statistics.mean(r['completion_tokens'] for r in rows):.0f} tokens/item, "
            f"wall {time.perf_counter() - started:.0f}s ({len(rows) - len(todo)} items resumed) -> {out}"
        )


def interleaved(items: list[dict]) -> list[dict]:
    """The items with the tasks in turn (each task's first item, then each one's second, ...), so that the rows
    of a run stopped part-way spread over every task."""
    by_task: dict[str, list[dict]] = {}
    for item in items:
        by_task.setdefault(item["task"], []).append(item)
    return [item for turn in itertools.zip_longest(*by_task.values()) for item in turn if item is not None]


# ---- replays over cyberv-full's candidates ---------------------------------------------------------------


def _vote(candidates: list[dict]) -> str | None:
    """Self-consistency: the most common answer (the first seen wins a tie), None when nobody answered."""
    answers = [c["answer"] for c in candidates if c["answer"] is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


# ---- report ----------------------------------------------------------------------------------------------


def load_runs(folder: Path, items: dict[str, dict]) -> dict[str, dict[int, dict[str, dict]]]:
    """arm -> seed -> item id -> row, every returned text graded again by today's grader: a fix to the
    grader applies to every arm alike, never to some runs only."""
    runs: dict[str, dict[int, dict[str, dict]]] = {}
    for path in sorted(folder.glob("*-s*.jsonl")):
        arm, seed = path.stem.rsplit("-s", 1)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            graded = grade(items[row["id"]], row["text"])
            row["correct"], row["answer"] = graded.correct, graded.answer
        runs.setdefault(arm, {})[int(seed)] = {r["id"]: r for r in rows}
    return runs


def item_scores(runs: dict[int, dict[str, dict]], ids: list[str]) -> list[float]:
    """Per item, the fraction of seeds that got it right."""
    return [statistics.mean(float(seeds[i]["correct"]) for seeds in runs.values()) for i in ids]


def report(args: argparse.Namespace) -> None:
    items = {item["id"]: item for item in load_items(args.split)}
    runs = load_runs(RESULTS / args.model / args.split, items)
    summary: dict = {"split": args.split, "arms": {}, "versus_none": {}, "cyberv_samples": {}}
    lines = ["| arm | items | runs | accuracy | 95% CI | completion tokens / item |", "|---|---|---|---|---|---|"]
    for arm, seeds in runs.items():
        ids = sorted(set.intersection(*(set(s) for s in seeds.values())))
        k = sum(seeds[s][i]["correct"] for s in seeds for i in ids)
        total = len(ids) * len(seeds)
        lo, hi = wilson(k, total)
        per_item = statistics.mean(seeds[s][i]["completion_tokens"] for s in seeds for i in ids)
        per_seed = [statistics.mean(float(seeds[s][i]["correct"]) for i in ids) for s in seeds]
        summary["arms"][arm] = {
            "items": len(ids),
            "seeds": sorted(seeds),
            "accuracy": k / total,
            "ci95": [lo, hi],
            "per_seed": per_seed,
            "tokens_per_item": per_item,
        }
        spread = f" (seeds {min(per_seed):.1%}-{max(per_seed):.1%})" if len(seeds) > 1 else ""
        lines.append(
            f"| {arm} | {len(ids)} | {len(seeds)} | {k / total:.1%}{spread} | {lo:.1%}-{hi:.1%} | {per_item:.0f} |"
        )

    lines += [
        "",
        "| arm vs none (same items) | difference | 95% paired-bootstrap CI | McNemar p (items only the arm / "
        "only none got right) |",
        "|---|---|---|---|",
    ]
    base = runs.get("none")
    for arm, seeds in runs.items():
        if arm == "none" or base is None:
            continue
        ids = sorted(set(base[0]) & set.intersection(*(set(s) for s in seeds.values())))
        a, b = item_scores(base, ids), item_scores(seeds, ids)
        boot = paired_bootstrap(a, b)
        test = mcnemar([x == 1 for x in a], [x == 1 for x in b]) if len(seeds) == 1 else None
        summary["versus_none"][arm] = {
            "items": len(ids),
            "difference": boot.diff,
            "ci95": [boot.low, boot.high],
            "mcnemar": None if test is None else {"p": test.p_value, "only_arm": test.b_only, "only_none": test.a_only},
        }
        mc = "-" if test is None else f"{test.p_value:.3f} ({test.b_only} vs {test.a_only})"
        lines.append(f"| {arm} ({len(ids)} items) | {boot.diff:+.1%} | {boot.low:+.1%} to {boot.high:+.1%} | {mc} |")

    lines += deepconf_table(runs, summary)
    lines += cyberv_variants_table(runs, summary)
    full = runs.get("cyberv-full")
    if full:
        lines += ["", *cyberv_samples(full, items, summary)]
    text = "\n".join(lines)
    (RESULTS / args.model / f"{args.split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    readme = README.read_text()
    start, end = f"<!-- quality:{args.model}:start -->", f"<!-- quality:{args.model}:end -->"
    if args.split == "test" and start in readme and end in readme:
        head, rest = readme.split(start, 1)
        README.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
        print(f"README quality section of {args.model} rewritten from {RESULTS / args.model}")


def deepconf_table(runs: dict[str, dict[int, dict[str, dict]]], summary: dict) -> list[str]:
    """Each DeepConf arm against self-consistency over the same trace budget (issue 27's comparison), paired by
    item: the accuracy difference and the ratio of completion tokens, each with a 95% bootstrap interval."""
    base = runs.get("self-consistency")
    arms = [arm for arm in runs if arm.startswith("deepconf")]
    if not base or not arms:
        return []
    lines = [
        "",
        "| against self-consistency (same items, same trace budget) | items | accuracy difference (95% CI) | "
        "completion tokens ratio (95% CI) |",
        "|---|---|---|---|",
    ]
    results = summary["versus_self_consistency"] = {}
    for name in arms:
        arm = runs[name]
        ids = sorted(set.intersection(*(set(s) for s in (*base.values(), *arm.values()))))
        boot = paired_bootstrap(item_scores(base, ids), item_scores(arm, ids))
        spent = [statistics.mean(seeds[i]["completion_tokens"] for seeds in arm.values()) for i in ids]
        full = [statistics.mean(seeds[i]["completion_tokens"] for seeds in base.values()) for i in ids]
        ratio = sum(spent) / sum(full)
        ratio_lo, ratio_hi = ratio_interval(spent, full, ids)
        results[name] = {
            "items": len(ids),
            "difference": boot.diff,
            "ci95": [boot.low, boot.high],
            "tokens_ratio": ratio,
            "tokens_ratio_ci95": [ratio_lo, ratio_hi],
        }
        lines.append(
            f"| {name} | {len(ids)} | {boot.diff:+.1%} ({boot.low:+.1%} to {boot.high:+.1%}) | "
            f"{ratio:.2f}x ({ratio_lo:.2f}-{ratio_hi:.2f}) |"
        )
    return lines


def cyberv_variants_table(runs: dict[str, dict[int, dict[str, dict]]], summary: dict) -> list[str]:
    """CyberV's cheaper variants (adaptive round 1, DeepConf's confidence stop and vote) against cyberv-full,
    paired by item over seed 0 of each: the accuracy difference; completion tokens against cyberv-full's and
    against self-consistency over cyberv-full's n candidates (its round 1 without the controller's calls); and
    how often each returns the answer cyberv-full returned, and the one the majority of its n candidates gives.
    The runs draw their samples independently, so "same answer" is bounded by how often two runs of one arm
    agree: read it beside the adaptive arm's, whose stop replayed on the same samples is in the stopping table."""
    full = runs.get("cyberv-full", {}).get(0)
    arms = [arm for arm in ("cyberv", "cyberv-confstop") if 0 in runs.get(arm, {})]
    if not full or not arms:
        return []
    n = ARMS["cyberv-full"]["n"]
    lines = [
        "",
        f"| against cyberv-full (seed 0, same items) | items | accuracy difference (95% CI) | tokens vs cyberv-full "
        f"(95% CI) | tokens vs self-consistency at n = {n} (95% CI) | same answer as cyberv-full | same answer as "
        f"the majority of its {n} |",
        "|---|---|---|---|---|---|---|",
    ]
    results = summary["versus_cyberv_full"] = {}
    for name in arms:
        arm = runs[name][0]
        ids = sorted(set(full) & set(arm))
        boot = paired_bootstrap([float(full[i]["correct"]) for i in ids], [float(arm[i]["correct"]) for i in ids])
        spent = [arm[i]["completion_tokens"] for i in ids]
        full_spent = [full[i]["completion_tokens"] for i in ids]
        sc_spent = [tokens(full[i]["trace"]["candidates"][:n]) for i in ids]
        vs_full, vs_sc = sum(spent) / sum(full_spent), sum(spent) / sum(sc_spent)
        full_ci, sc_ci = ratio_interval(spent, full_spent, ids), ratio_interval(spent, sc_spent, ids)
        same = sum(arm[i]["answer"] == full[i]["answer"] for i in ids)
        same_majority = sum(arm[i]["answer"] == _vote(full[i]["trace"]["candidates"][:n]) for i in ids)
        results[name] = {
            "items": len(ids),
            "difference": boot.diff,
            "ci95": [boot.low, boot.high],
            "tokens_vs_cyberv_full": vs_full,
            "tokens_vs_cyberv_full_ci95": list(full_ci),
            "tokens_vs_self_consistency_n": vs_sc,
            "tokens_vs_self_consistency_n_ci95": list(sc_ci),
            "same_answer_as_cyberv_full": same / len(ids),
            "same_answer_as_majority_n": same_majority / len(ids),
        }
        agree, agree_majority = wilson(same, len(ids)), wilson(same_majority, len(ids))
        lines.append(
            f"| {name} | {len(ids)} | {boot.diff:+.1%} ({boot.low:+.1%} to {boot.high:+.1%}) | {vs_full:.2f}x "
            f"({full_ci[0]:.2f}-{full_ci[1]:.2f}) | {vs_sc:.2f}x ({sc_ci[0]:.2f}-{sc_ci[1]:.2f}) | "
            f"{same / len(ids):.1%} ({agree[0]:.1%}-{agree[1]:.1%}) | {same_majority / len(ids):.1%} "
            f"({agree_majority[0]:.1%}-{agree_majority[1]:.1%}) |"
        )
    return lines


def cyberv_samples(full: dict[int, dict[str, dict]], items: dict[str, dict], summary: dict) -> list[str]:
    """Self-consistency at k = 1..n and the stopping rule, replayed over cyberv-full's traced candidates."""
    n = ARMS["cyberv-full"]["n"]
    rows = [(items[i], r) for seeds in full.values() for i, r in seeds.items()]
    sc_lines = [
        "| self-consistency over cyberv-full's candidates | accuracy | completion tokens / item |",
        "|---|---|---|",
    ]
    sc = {}
    for k in range(1, n + 1):
        correct = [grade_answer(item, _vote(r["trace"]["candidates"][:k])).correct for item, r in rows]
        spent = statistics.mean(tokens(r["trace"]["candidates"][:k]) for _, r in rows)
        sc[k] = {"accuracy": statistics.mean(correct), "tokens_per_item": spent}
        sc_lines.append(f"| majority of the first {k} | {sc[k]['accuracy']:.1%} | {spent:.0f} |")
    summary["cyberv_samples"] = {"runs": len(rows), "self_consistency": sc}
    # CyberV's controller against plain voting over exactly its candidates, item run by item run.
    voted = [float(grade_answer(item, _vote(r["trace"]["candidates"])).correct) for item, r in rows]
    controlled = [float(r["correct"]) for _, r in rows]
    boot = paired_bootstrap(voted, controlled)
    summary["cyberv_samples"]["cyberv_vs_self_consistency_n"] = {"difference": boot.diff, "ci95": [boot.low, boot.high]}
    sc_lines.append(
        f"| cyberv-full's own answer (the controller) | {statistics.mean(controlled):.1%} | "
        f"{statistics.mean(r['completion_tokens'] for _, r in rows):.0f} (all its calls) |"
    )
    sc_lines += [
        "",
        f"CyberV's controller against the majority of the same {n} candidates, paired over {len(rows)} "
        f"item runs: {boot.diff:+.1%} (95% CI {boot.low:+.1%} to {boot.high:+.1%}).",
    ]
    return [*sc_lines, "", *stopping_table(full, summary)]


def stopping_table(full: dict[int, dict[str, dict]], summary: dict) -> list[str]:
    """The adaptive round 1's stopping rule replayed over cyberv-full's candidates (`stopping.py`): at n = 8 on
    the rounds as run, and at larger n on rounds pooled from the seeds' candidates."""
    n = ARMS["cyberv-full"]["n"]
    stored = [{"id": i, **r["trace"]} for seeds in full.values() for i, r in seeds.items()]
    lines = [
        "| n | stopping rule replayed over the same candidates | candidates drawn | completion tokens / round | "
        "vs self-consistency at n (95% CI) | same decision as all n (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    results = summary["cyberv_samples"]["stopping"] = {}

    def add(
        size: int, items: list[str], name: str, replayed: Replayed, thresholds: dict[int, float] | None = None
    ) -> None:
        lo, hi = wilson(replayed.agreed, replayed.rounds)
        ratio_lo, ratio_hi = ratio_interval(replayed.spent, replayed.full, items)
        results.setdefault(f"n={size}", {})[name] = {
            "rounds": replayed.rounds,
            "mean_drawn": replayed.drawn,
            "tokens_per_round": replayed.tokens,
            "tokens_vs_sc_n": replayed.ratio,
            "tokens_vs_sc_n_ci95": [ratio_lo, ratio_hi],
            "same_decision_as_full_n": replayed.same,
            "same_decision_ci95": [lo, hi],
            **({"thresholds": thresholds} if thresholds else {}),
        }
        lines.append(
            f"| {size} | {name} | {replayed.drawn:.1f} | {replayed.tokens:.0f} | {replayed.ratio:.3f}x "
            f"({ratio_lo:.3f}-{ratio_hi:.3f}) | {replayed.same:.1%} ({lo:.1%}-{hi:.1%}) |"
        )

    # A pooled round of m needs m - 1 reasoning candidates per item: n - 1 from each seed's run.
    pooled = [m for m in POOLED_N if m - 1 <= len(full) * (n - 1)]
    for size, traces in [(n, stored), *((m, pooled_rounds(full, m)) for m in pooled)]:
        rounds = [forecast_round(trace, size, THETA) for trace in traces]
        items = [trace["id"] for trace in traces]  # an item's rounds are resampled together
        for stop_risk in STOP_RISKS:
            for batch in (1, 2):
                add(
                    size,
                    items,
                    f"stop_risk {stop_risk}, batches of {batch}",
                    replay(rounds, stop_risk_rule(size, batch, stop_risk)),
                )
        thresholds, fitted = fit_thresholds(rounds, SAME_DECISION_TARGET)
        add(
            size,
            items,
            "in-sample best: a share threshold per draw fitted to these very outcomes, batches of 1",
            fitted,
            thresholds,
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one arm over the suite")
    run.add_argument("arm", choices=sorted(ARMS))
    run.add_argument("--params", default="{}", help="extra policy parameters as a JSON object")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--refine", default="http://127.0.0.1:8000")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--concurrency", type=int, default=16)
    run.add_argument("--limit", type=int, default=0, help="an even spread of N items (0: all)")
    for parser in (run, sub.add_parser("report", help="tables and the README section from the runs")):
        parser.add_argument("--split", default="test", choices=["dev", "test"])
        parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="the served model id")
    args = ap.parse_args()
    if args.command == "run":
        asyncio.run(run_arm(args))
    else:
        report(args)


if __name__ == "__main__":
    main()
