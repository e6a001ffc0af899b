"""bench/quality.py's report: runs are read per model, and the stopping replay pools rounds larger than the runs'
n only where the model's seeds hold enough candidates (Qwen2.5-Coder-0.5B-Instruct's cyberv-full ran one seed)."""

from __future__ import annotations

import json

from quality import RESULTS, load_items, load_runs, stopping_table

SMOLLM2 = RESULTS / "SmolLM2-135M-Instruct"


def _full(seeds: int, limit: int = 6) -> dict[int, dict[str, dict]]:
    runs = {}
    for seed in range(seeds):
        rows = (SMOLLM2 / "test" / f"cyberv-full-s{seed}.jsonl").read_text().splitlines()[:limit]
        runs[seed] = {row["id"]: row for row in map(json.loads, rows)}
    return runs


def test_runs_are_read_from_the_models_own_folder() -> None:
    items = {item["id"]: item for item in load_items("test")}
    runs = load_runs(SMOLLM2 / "test", items)
    assert {"none", "srgen", "cyberv", "cyberv-full", "rain"} <= set(runs)
    assert sorted(runs["cyberv-full"]) == [0, 1, 2]
    assert len(runs["none"][0]) == 480


def test_pooled_rounds_need_enough_seeds() -> None:
    # n = 8 holds 7 reasoning candidates per run: 12 needs 11 (two seeds), 16 needs 15 (three).
    for seeds, sizes in [(1, {"n=8"}), (2, {"n=8", "n=12"}), (3, {"n=8", "n=12", "n=16"})]:
        summary: dict = {"cyberv_samples": {}}
        lines = stopping_table(_full(seeds), summary)
        assert set(summary["cyberv_samples"]["stopping"]) == sizes
        assert {line.split(" | ")[0].lstrip("| ") for line in lines[2:]} == {s.removeprefix("n=") for s in sizes}
