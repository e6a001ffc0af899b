"""Build the held-out quality suite from published task data: BIG-bench's task files and reasoning-gym's
seeded generators, both from PyPI (no model hub).

    python -m venv .venv-suite && .venv-suite/bin/pip install reasoning-gym==0.1.25
    .venv-suite/bin/python bench/suite.py            # writes bench/tasks/suite-dev.jsonl and suite-test.jsonl
    .venv-suite/bin/python bench/suite.py --check    # rebuilds and compares with the committed files

Sources:
- BIG-bench 1.0.0's sdist (358 MB, downloaded once into bench/.cache/, checked against its sha256): only the
  `task.json` files named in `BIGBENCH` are read. Multiple-choice tasks become questions with lettered options
  in a shuffled order, the gold option at each letter equally often within a task and split.
- reasoning-gym 0.1.25: the generators in `REASONING_GYM`, each with its own seed and difficulty settings.

Every item: {"id", "split", "source", "task", "question", "kind", "answer", "options", "aliases"}. `question` is
what a client sends: the task's text, its options, and one neutral line on the form of the answer (no
"The answer is X" template a small model could copy). `answer` is the gold: a number, an option letter, or a
short text. Each task contributes `DEV_PER_TASK` dev items and `TEST_PER_TASK` test items, disjoint; the
tasks were chosen on the dev split alone (the bundled model's greedy accuracy between 30% and 70%, see the
README), and the test split is frozen: results quoted in the README come from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).parent
TASKS = HERE / "tasks"
CACHE = HERE / ".cache"
SEED = 20261127
DEV_PER_TASK = 20
TEST_PER_TASK = 60

BIGBENCH_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8"
    "cfc721c157/bigbench-1.0.0.tar.gz"
)
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

# BIG-bench task folder -> kind of answer. Number tasks are graded on the number; the others are lettered options.
BIGBENCH = {
    "arithmetic/1_digit_subtraction": "number",
    "navigate": "choice",
    "sports_understanding": "choice",
    "strategyqa": "choice",
}
# reasoning-gym dataset -> its settings: difficulty chosen so that the bundled model is neither always right
# nor always wrong.
REASONING_GYM = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "allow_negation": False,
        "allow_parentheses": False,
    },
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 20},
}

NUMBER_LINE = "Give the final answer as a number."
CHOICE_LINE = "Choose one option and give its letter."
LETTERS = "ABCDEFGHIJ"


# ---- BIG-bench -------------------------------------------------------------------------------------------


def bigbench_archive() -> Path:
    path = CACHE / "bigbench-1.0.0.tar.gz"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        print(f"downloading {BIGBENCH_URL} (358 MB, once)", file=sys.stderr)
        urllib.request.urlretrieve(BIGBENCH_URL, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != BIGBENCH_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not BIG-bench 1.0.0's {BIGBENCH_SHA256}")
    return path


def bigbench_tasks(archive: Path) -> dict[str, dict]:
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json": name for name in BIGBENCH}
    found: dict[str, dict] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name in wanted:
                found[wanted[member.name]] = json.load(tar.extractfile(member))
    missing = set(BIGBENCH) - set(found)
    if missing:
        raise SystemExit(f"not in the archive: {sorted(missing)}")
    return found


def bigbench_items(name: str, task: dict) -> Iterator[dict]:
    kind = BIGBENCH[name]
    prefix = task.get("task_prefix", "").strip()
    for index, example in enumerate(task["examples"]):
        text = example["input"].strip()
        if prefix:
            text = f"{prefix}\n\n{text}"
        item_id = f"bigbench/{name}/{index}"
        if kind == "number":
            gold = example["target"]
            targets = gold if isinstance(gold, list) else [gold]
            number = next((t for t in targets if t.strip().lstrip("-").isdigit()), None)
            if number is None:
                continue
            yield _item(
                item_id,
                f"bigbench/{name}",
                "number",
                f"{text}\n\n{NUMBER_LINE}",
                number.strip(),
                aliases=[t for t in targets if t != number],
            )
        else:
            scores = example["target_scores"]
            correct = [option for option, score in scores.items() if score == 1]
            if len(correct) != 1 or len(scores) > len(LETTERS):
                continue
            yield _choice_item(item_id, f"bigbench/{name}", text, list(scores), correct[0])


# ---- reasoning-gym ---------------------------------------------------------------------------------------


def reasoning_gym_items(name: str, size: int) -> Iterator[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, size=size, seed=SEED, **REASONING_GYM[name])
    for index, entry in enumerate(dataset):
        gold = str(entry["answer"]).strip()
        yield _item(
            f"reasoning_gym/{name}/{index}",
            f"reasoning_gym/{name}",
            "number",
            f"{entry['question'].strip()}\n\n{NUMBER_LINE}",
            gold,
        )


# ---- items -----------------------------------------------------------------------------------------------


def _item(
    item_id: str,
    task: str,
    kind: str,
    question: str,
    answer: str,
    *,
    options: dict | None = None,
    aliases: list[str] | None = None,
) -> dict:
    return {
        "id": item_id,
        "split": None,
        "source": task.split("/")[0],
        "task": task,
        "question": question,
        "kind": kind,
        "answer": answer,
        "options": options,
        "aliases": aliases or [],
    }


def _choice_item(item_id: str, task: str, text: str, options: list[str], correct: str) -> dict:
    """A multiple-choice item before its options are lettered (`letter_options` does that per split)."""
    return {**_item(item_id, task, "choice", text, correct), "unlettered": options}


def letter_options(items: list[dict], rng: random.Random) -> list[dict]:
    """Letter each item's options in a shuffled order, with the gold option at each letter equally often
    (a model that always says (A) scores chance, exactly), then write the options into the question."""
    out = []
    positions: list[int] = []
    for item in items:
        if item["kind"] != "choice":
            out.append(item)
            continue
        options = item.pop("unlettered")
        if not positions:
            positions = list(range(len(options)))
            rng.shuffle(positions)
        others = [option for option in options if option != item["answer"]]
        rng.shuffle(others)
        others.insert(positions.pop() % len(options), item["answer"])
        lettered = dict(zip(LETTERS, others))
        listing = "\n".join(f"({letter}) {option}" for letter, option in lettered.items())
        gold = next(letter for letter, option in lettered.items() if option == item["answer"])
        out.append(
            {
                **item,
                "question": f"{item['question']}\n\n{listing}\n\n{CHOICE_LINE}",
                "answer": gold,
                "options": lettered,
            }
        )
    return out


def split(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """DEV_PER_TASK + TEST_PER_TASK items per task, drawn without replacement in a seeded order."""
    dev, test = [], []
    for task in sorted({item["task"] for item in items}):
        pool = [item for item in items if item["task"] == task]
        random.Random(f"{SEED}/{task}").shuffle(pool)
        if len(pool) < DEV_PER_TASK + TEST_PER_TASK:
            raise SystemExit(f"{task}: only {len(pool)} usable items")
        dev += letter_options(
            [{**item, "split": "dev"} for item in pool[:DEV_PER_TASK]], random.Random(f"{SEED}/{task}/dev")
        )
        test += letter_options(
            [{**item, "split": "test"} for item in pool[DEV_PER_TASK : DEV_PER_TASK + TEST_PER_TASK]],
            random.Random(f"{SEED}/{task}/test"),
        )
    return dev, test


def build() -> tuple[list[dict], list[dict]]:
    items: list[dict] = []
    for name, task in bigbench_tasks(bigbench_archive()).items():
        items += bigbench_items(name, task)
    for name in REASONING_GYM:
        items += reasoning_gym_items(name, 4 * (DEV_PER_TASK + TEST_PER_TASK))
    return split(items)


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rebuild and compare with the committed files")
    args = ap.parse_args()
    dev, test = build()
    files = {TASKS / "suite-dev.jsonl": _jsonl(dev), TASKS / "suite-test.jsonl": _jsonl(test)}
    if args.check:
        stale = [path.name for path, text in files.items() if not path.exists() or path.read_text() != text]
        raise SystemExit(f"differs from the build: {stale}" if stale else 0)
    for path, text in files.items():
        path.write_text(text)
    print(f"dev {len(dev)} items, test {len(test)} items, {len({i['task'] for i in test})} tasks")


if __name__ == "__main__":
    main()
