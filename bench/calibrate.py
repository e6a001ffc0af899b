"""Fit `auto`'s thresholds for one model on the dev split, and write its calibration file.

    # the first answers' signals: auto with a threshold every answer reaches (nothing escalates)
    .venv/bin/python bench/quality.py run auto-probe --split dev --model M          # CyberV's direct call
    .venv/bin/python bench/quality.py run auto-probe-request --split dev --model M  # the client's request
    # thresholds at which auto escalates 50% of the dev items, every signal, both first calls
    .venv/bin/python bench/calibrate.py --model M --rate 0.5
    # or: the fewest escalations that reach an accuracy, given the escalation policy's runs on the same items
    .venv/bin/python bench/calibrate.py --model M --accuracy 0.5 --escalation RESULTS/dev/cyberv-full-s0.jsonl

Writes refine_server/models/calibration/<model>.json (what refine ships and loads; `--out` elsewhere, for
`refine --auto-calibration FILE`). No engine calls: it reads the probe runs.

Escalation rate: a signal that is sure at or above its threshold (confidences, the margin) escalates the items
below it and those it could not measure; the threshold is the smallest value at which at least `rate` of the
items escalate. Entropies mirror it. Accuracy: auto's accuracy at threshold t is the probe's first answer's
grade where the item is sure and the escalation run's where it is not; the threshold is the one with the fewest
escalations that reaches `accuracy` (or, when none does, the most accurate; the file says which).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the repository's packages, when run as a script

from refine_server.policies.auto.signals import SIGNALS, SURE_WHEN_HIGH, is_sure  # noqa: E402

RESULTS = HERE / "results" / "quality"
SHIPPED = HERE.parent / "refine_server" / "models" / "calibration"
PROBES = {"cyberv_direct": "auto-probe", "request": "auto-probe-request"}


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def signal_values(rows: list[dict], signal: str) -> list[float]:
    """Each item's value of `signal` in its probe trace (NaN where the first answer could not be measured)."""
    values = []
    for row in rows:
        value = (row["trace"].get("signals") or {}).get(signal)
        values.append(math.nan if value is None else float(value))
    return values


def candidates(values: list[float]) -> list[float]:
    """Thresholds that separate the items differently: every measured value, and one beyond each end."""
    known = sorted({v for v in values if not math.isnan(v)})
    if not known:
        return [0.0]
    return [known[0] - 1.0, *known, known[-1] + 1.0]


def escalation_rate(values: list[float], signal: str, threshold: float) -> float:
    return sum(not is_sure(signal, v, threshold) for v in values) / len(values)  # type: ignore[arg-type]


def fit_rate(values: list[float], signal: str, rate: float) -> float:
    """The threshold closest to the sure side at which at least `rate` of the items escalate."""
    options = candidates(values)
    # From the sure side inwards: confidences from the lowest threshold up, entropies from the highest down.
    order = options if SURE_WHEN_HIGH[signal] else list(reversed(options))  # type: ignore[index]
    for threshold in order:
        if escalation_rate(values, signal, threshold) >= rate:
            return threshold
    return order[-1]


def fit_accuracy(
    values: list[float], signal: str, first: list[bool], escalated: list[bool], accuracy: float
) -> tuple[float, float, float]:
    """(threshold, its accuracy, its escalation rate): the fewest escalations that reach `accuracy`, else the
    most accurate threshold."""
    scored = []
    for threshold in candidates(values):
        sure = [is_sure(signal, v, threshold) for v in values]  # type: ignore[arg-type]
        acc = sum(f if s else e for s, f, e in zip(sure, first, escalated)) / len(values)
        scored.append((threshold, acc, 1 - sum(sure) / len(values)))
    reaching = [s for s in scored if s[1] >= accuracy]
    return min(reaching, key=lambda s: s[2]) if reaching else max(scored, key=lambda s: (s[1], -s[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", default="dev")
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--rate", type=float, help="the share of items auto escalates")
    target.add_argument("--accuracy", type=float, help="auto's accuracy to reach with the fewest escalations")
    ap.add_argument("--escalation", type=Path, help="--accuracy: the escalation policy's run on the same items")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where quality.py's runs are")
    ap.add_argument("--out", type=Path, help=f"default: {SHIPPED}/<model>.json")
    args = ap.parse_args()
    if args.accuracy is not None and args.escalation is None:
        ap.error("--accuracy needs --escalation")

    thresholds: dict[str, dict[str, float]] = {}
    fitted: dict[str, dict] = {}
    for first_call, arm in PROBES.items():
        path = args.results / args.split / f"{arm}-s0.jsonl"
        if not path.exists():
            print(f"no {path}: no {first_call} thresholds")
            continue
        rows = load_rows(path)
        thresholds[first_call] = {}
        fitted[first_call] = {"probe": str(path.resolve().relative_to(HERE.parent.resolve())), "items": len(rows)}
        escalation = {r["id"]: r for r in load_rows(args.escalation)} if args.escalation else {}
        for signal in SIGNALS:
            values = signal_values(rows, signal)
            if args.rate is not None:
                t = fit_rate(values, signal, args.rate)
                report = {"escalation_rate": round(escalation_rate(values, signal, t), 4)}
            else:
                first = [bool(r["correct"]) for r in rows]
                escalated = [bool(escalation[r["id"]]["correct"]) for r in rows]
                t, acc, rate = fit_accuracy(values, signal, first, escalated, args.accuracy)
                report = {"accuracy": round(acc, 4), "escalation_rate": round(rate, 4)}
            thresholds[first_call][signal] = round(t, 6)
            fitted[first_call][signal] = report
            print(f"{first_call:14} {signal:24} threshold {t:10.4f}  {report}")
    out = args.out or SHIPPED / f"{args.model}.json"
    target_of = {"escalation_rate": args.rate} if args.rate is not None else {"accuracy": args.accuracy}
    calibration = {
        "model": args.model,
        "thresholds": thresholds,
        "fitted": {
            "split": args.split,
            "target": target_of,
            **({"escalation": str(args.escalation)} if args.escalation else {}),
            "by_first_call": fitted,
        },
    }
    out.write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
