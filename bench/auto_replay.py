"""`auto` replayed at any threshold from two runs on the same items, with no new engine calls: a probe run
(auto with a threshold every answer reaches: each item's first answer, its grade, its tokens and every signal)
and a run of the escalation policy.

    .venv/bin/python bench/auto_replay.py --split dev --escalation cyberv-full --signal lowest_group_confidence

For a threshold t, an item whose signal is on the sure side gets the first answer (its grade, its tokens); any
other gets the escalation run's answer and tokens. With CyberV as the escalation the first call is CyberV's
own direct call, which auto hands over, so an escalated item costs exactly the CyberV run's tokens; with any
other escalation it costs the first call's tokens plus the escalation's (`--first-call request`).

Writes a table (stdout, and bench/results/auto-<split>-<escalation>-<signal>.json) over the thresholds at
which 0, 10, ..., 100% of the items escalate, the calibrated threshold when given, and a plot of accuracy
against completion tokens per item: PNG (drawn with Pillow, which the environment has; matplotlib is not a
dependency), in bench/results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the repository's packages, when run as a script

from calibrate import PROBES, RESULTS, fit_rate, load_rows, signal_values  # noqa: E402
from grading import grade_answer  # noqa: E402
from quality import _vote, load_items  # noqa: E402
from stats import paired_bootstrap, ratio_interval  # noqa: E402
from stopping import tokens  # noqa: E402

from refine_server.policies.auto.signals import SIGNALS, is_sure  # noqa: E402

RATES = [i / 10 for i in range(11)]


def replay(probe: list[dict], escalation: dict[str, dict], signal: str, threshold: float, request: bool) -> dict:
    """auto's accuracy, tokens per item and escalation rate at `threshold`, over the items of both runs, and
    against the escalation policy alone on the same items: the accuracy difference (95% paired bootstrap over
    items) and the ratio of completion tokens (95% bootstrap over items)."""
    values = signal_values(probe, signal)
    correct: list[float] = []
    tokens: list[float] = []
    escalated = 0
    for row, value in zip(probe, values):
        if is_sure(signal, value, threshold):  # type: ignore[arg-type]
            correct.append(float(row["correct"]))
            tokens.append(row["completion_tokens"])
        else:
            other = escalation[row["id"]]
            escalated += 1
            correct.append(float(other["correct"]))
            tokens.append(other["completion_tokens"] + (row["completion_tokens"] if request else 0))
    alone = [escalation[row["id"]] for row in probe]
    boot = paired_bootstrap([float(r["correct"]) for r in alone], correct)
    alone_tokens = [r["completion_tokens"] for r in alone]
    n = len(probe)
    return {
        "threshold": threshold,
        "escalation_rate": escalated / n,
        "accuracy": sum(correct) / n,
        "tokens_per_item": sum(tokens) / n,
        "versus_escalation": {
            "difference": boot.diff,
            "ci95": [boot.low, boot.high],
            "tokens_ratio": sum(tokens) / sum(alone_tokens),
            "tokens_ratio_ci95": list(ratio_interval(tokens, alone_tokens, [row["id"] for row in probe])),
        },
    }


def self_consistency(escalated: list[dict], items: dict[str, dict]) -> list[dict]:
    """Self-consistency at k = 1..n over a CyberV run's own candidates (the majority of the first k answers, as
    bench/quality.py replays it): accuracy and tokens per item, on the same items. Empty for other policies."""
    if not all("candidates" in (row.get("trace") or {}) for row in escalated):
        return []
    n = min(len(row["trace"]["candidates"]) for row in escalated)
    curve = []
    for k in range(1, n + 1):
        picks = [row["trace"]["candidates"][:k] for row in escalated]
        correct = [grade_answer(items[row["id"]], _vote(cands)).correct for row, cands in zip(escalated, picks)]
        curve.append(
            {
                "k": k,
                "accuracy": sum(correct) / len(correct),
                "tokens_per_item": sum(tokens(c) for c in picks) / len(picks),
            }
        )
    return curve


def plot(points: list[dict], baselines: dict[str, dict], title: str, out: Path, voting: list[dict]) -> None:
    """Accuracy against tokens per item: auto's curve over thresholds (blue), self-consistency at k = 1..n over
    the escalation's candidates (green), and each baseline's point (red)."""
    width, height, pad = 720, 480, 60
    everything = [*points, *voting, *baselines.values()]
    xs = [p["tokens_per_item"] for p in everything]
    ys = [p["accuracy"] for p in everything]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)

    def at(p: dict) -> tuple[float, float]:
        x = pad + (p["tokens_per_item"] - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (p["accuracy"] - y0) / ((y1 - y0) or 1.0) * (height - 2 * pad)
        return x, y

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for k in range(5):  # axis ticks
        tx = x0 + (x1 - x0) * k / 4
        ty = y0 + (y1 - y0) * k / 4
        gx = pad + (width - 2 * pad) * k / 4
        gy = height - pad - (height - 2 * pad) * k / 4
        draw.text((gx - 10, height - pad + 6), f"{tx:.0f}", fill="black")
        draw.text((8, gy - 6), f"{ty:.0%}", fill="black")
    draw.text((width / 2 - 90, height - 22), "completion tokens per item", fill="black")
    draw.text((pad, 20), title, fill="black")
    curve = [at(p) for p in sorted(points, key=lambda p: p["tokens_per_item"])]
    draw.line(curve, fill="blue", width=2)
    for p, (x, y) in zip(points, (at(p) for p in points)):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="blue")
        if "label" in p:
            draw.text((x + 5, y - 14), p["label"], fill="blue")
    if voting:
        draw.line([at(p) for p in voting], fill="green", width=2)
        for p in voting:
            x, y = at(p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="green")
            draw.text((x + 4, y + 4), f"sc{p['k']}", fill="green")
    for name, p in baselines.items():
        x, y = at(p)
        draw.rectangle([x - 4, y - 4, x + 4, y + 4], fill="red")
        draw.text((x + 6, y + 2), name, fill="red")
    image.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--escalation", default="cyberv-full", help="the escalation policy's arm (its -s0 run)")
    ap.add_argument("--first-call", choices=sorted(PROBES), default="cyberv_direct")
    ap.add_argument("--signal", choices=SIGNALS, default="lowest_group_confidence")
    ap.add_argument("--calibration", type=Path, help="a calibration file: its threshold is marked")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct", help="whose runs (bench/quality.py --model)")
    ap.add_argument("--baselines", nargs="*", default=["none"], help="other arms' -s0 runs to plot as points")
    args = ap.parse_args()

    folder = RESULTS / args.model / args.split
    probe = load_rows(folder / f"{PROBES[args.first_call]}-s0.jsonl")
    escalation = {r["id"]: r for r in load_rows(folder / f"{args.escalation}-s0.jsonl")}
    probe = [r for r in probe if r["id"] in escalation]  # the items both runs answered
    request = args.first_call == "request"
    values = signal_values(probe, args.signal)
    points = []
    for rate in RATES:
        point = replay(probe, escalation, args.signal, fit_rate(values, args.signal, rate), request)
        points.append({**point, "target_rate": rate})
    if args.calibration:
        calibration = json.loads(args.calibration.read_text())
        t = calibration["thresholds"][args.first_call][args.signal]
        points.append({**replay(probe, escalation, args.signal, t, request), "label": "calibrated"})
    plain = {
        "accuracy": sum(r["correct"] for r in probe) / len(probe),
        "tokens_per_item": sum(r["completion_tokens"] for r in probe) / len(probe),
    }
    escalated = [escalation[r["id"]] for r in probe]
    voting = self_consistency(escalated, {item["id"]: item for item in load_items(args.split)})
    own = {
        "accuracy": sum(r["correct"] for r in escalated) / len(escalated),
        "tokens_per_item": sum(r["completion_tokens"] for r in escalated) / len(escalated),
    }
    baselines = {"first answer only": plain, args.escalation: own}
    for arm in args.baselines:
        path = folder / f"{arm}-s0.jsonl"
        if path.exists():
            rows = [r for r in load_rows(path) if r["id"] in escalation]
            baselines[arm] = {
                "accuracy": sum(r["correct"] for r in rows) / len(rows),
                "tokens_per_item": sum(r["completion_tokens"] for r in rows) / len(rows),
            }
    print(f"{len(probe)} items, signal {args.signal}, escalation {args.escalation}, first call {args.first_call}")
    print(
        f"| escalated | threshold | accuracy | tokens / item | vs {args.escalation} alone: accuracy (95% CI) "
        "| tokens ratio (95% CI) |"
    )
    print("|---|---|---|---|---|---|")
    for p in points:
        label = f" ({p['label']})" if "label" in p else ""
        v = p["versus_escalation"]
        print(
            f"| {p['escalation_rate']:.0%}{label} | {p['threshold']:.4g} | {p['accuracy']:.1%} "
            f"| {p['tokens_per_item']:.0f} | {v['difference']:+.1%} ({v['ci95'][0]:+.1%} to {v['ci95'][1]:+.1%}) "
            f"| {v['tokens_ratio']:.2f}x ({v['tokens_ratio_ci95'][0]:.2f}-{v['tokens_ratio_ci95'][1]:.2f}) |"
        )
    for name, p in baselines.items():
        print(f"| {name} | | {p['accuracy']:.1%} | {p['tokens_per_item']:.0f} | | |")
    stem = RESULTS / args.model / f"auto-{args.split}-{args.escalation}-{args.signal}"
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"items": len(probe), "points": points, "baselines": baselines, "self_consistency": voting}, indent=1
        )
        + "\n"
    )
    title = f"{args.model}, auto on {args.split}: {args.signal} -> {args.escalation} ({len(probe)} items)"
    plot(points, baselines, title, stem.with_suffix(".png"), voting)
    for p in voting:
        print(f"| self-consistency over its first {p['k']} | | {p['accuracy']:.1%} | {p['tokens_per_item']:.0f} | | |")
    print(f"-> {stem.relative_to(HERE.parent)}.json, .png")


if __name__ == "__main__":
    main()
