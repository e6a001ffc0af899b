"""bench/quality.py: runs are stored and read per model; a stopped run resumes from its rows so far, taken task by
task in turn; the stopping replay pools rounds larger than the runs' n only where the model's seeds hold enough
candidates (Qwen2.5-Coder-0.5B-Instruct's cyberv-full ran one seed)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import quality
from quality import RESULTS, interleaved, load_items, load_runs, run_arm, stopping_table

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


def test_interleaved_takes_the_tasks_in_turn() -> None:
    items = load_items("test")[::5][:96]
    order = interleaved(items)
    assert sorted(i["id"] for i in order) == sorted(i["id"] for i in items)
    tasks = sorted({i["task"] for i in items})
    assert len(tasks) == 8
    for turn in range(12):  # every task's k-th item before any task's (k+1)-th
        assert sorted(i["task"] for i in order[8 * turn : 8 * turn + 8]) == tasks


class _Completions:
    """The openai client's chat.completions, answering "7" to every question it is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def create(self, *, messages: list[dict], **_: object) -> SimpleNamespace:
        self.asked.append(messages[0]["content"])
        message = SimpleNamespace(content="7")
        usage = SimpleNamespace(completion_tokens=1)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=usage, model_extra={})


def test_a_stopped_run_resumes_from_its_partial_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    completions = _Completions()
    client = SimpleNamespace(chat=SimpleNamespace(completions=completions))
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "AsyncOpenAI", lambda **_: client)
    args = argparse.Namespace(
        split="test", limit=16, arm="none", params="{}", refine="", model="M", max_tokens=8, concurrency=2, seeds=[0]
    )
    items = load_items("test")[::30][:16]
    finished = interleaved(items)[:3]  # what a stopped run had written
    partial = tmp_path / "M" / "test" / "none-s0.jsonl.partial"
    partial.parent.mkdir(parents=True)
    kept = [{"id": i["id"], "text": "kept", "correct": False, "completion_tokens": 1} for i in finished]
    partial.write_text("".join(json.dumps(row) + "\n" for row in kept))

    asyncio.run(run_arm(args))

    assert sorted(completions.asked) == sorted(i["question"] for i in items if i not in finished)
    rows = [json.loads(line) for line in (tmp_path / "M" / "test" / "none-s0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [i["id"] for i in items]
    assert sum(r["text"] == "kept" for r in rows) == 3
    assert not partial.exists()


def test_deepconf_arms_are_paired_with_self_consistency_by_item() -> None:
    def run(correct: list[bool], tokens: list[int]) -> dict[int, dict[str, dict]]:
        return {0: {f"q{i}": {"correct": c, "completion_tokens": t} for i, (c, t) in enumerate(zip(correct, tokens))}}

    runs = {
        "self-consistency": run([True, False, True, False], [100, 100, 100, 100]),
        "deepconf": run([True, True, True, False], [50, 30, 40, 80]),
        "none": run([False] * 4, [10] * 4),
    }
    summary: dict = {}
    lines = quality.deepconf_table(runs, summary)
    result = summary["versus_self_consistency"]["deepconf"]
    assert result["items"] == 4 and result["difference"] == pytest.approx(0.25)
    assert result["tokens_ratio"] == pytest.approx(0.5)
    assert result["tokens_ratio_ci95"][0] <= 0.5 <= result["tokens_ratio_ci95"][1]
    assert any(line.startswith("| deepconf | 4 | +25.0%") for line in lines)
    assert quality.deepconf_table({"deepconf": runs["deepconf"]}, {}) == []  # nothing to pair with


def test_cyberv_variants_are_paired_with_cyberv_full_by_item_and_its_candidates_majority() -> None:
    def candidates(answers: list[str], tokens: int) -> list[dict]:
        return [{"answer": a, "completion_tokens": tokens} for a in answers]

    full = {
        "q0": {
            "correct": True,
            "answer": "4",
            "completion_tokens": 100,
            "trace": {"candidates": candidates(["4"] * 8, 10)},
        },
        "q1": {
            "correct": False,
            "answer": "5",
            "completion_tokens": 100,
            "trace": {"candidates": candidates(["6"] * 8, 10)},
        },
    }
    stopped = {
        "q0": {"correct": True, "answer": "4", "completion_tokens": 40},
        "q1": {"correct": True, "answer": "6", "completion_tokens": 20},
    }
    summary: dict = {}
    lines = quality.cyberv_variants_table({"cyberv-full": {0: full}, "cyberv-confstop": {0: stopped}}, summary)
    result = summary["versus_cyberv_full"]["cyberv-confstop"]
    assert result["items"] == 2 and result["difference"] == pytest.approx(0.5)
    assert result["tokens_vs_cyberv_full"] == pytest.approx(0.3)  # 60 of 200
    assert result["tokens_vs_self_consistency_n"] == pytest.approx(60 / 160)  # 8 candidates of 10 tokens, twice
    assert result["same_answer_as_cyberv_full"] == 0.5 and result["same_answer_as_majority_n"] == 1.0
    assert any(line.startswith("| cyberv-confstop | 2 | +50.0%") for line in lines)
    assert quality.cyberv_variants_table({"cyberv-full": {0: full}}, {}) == []  # no variant ran
