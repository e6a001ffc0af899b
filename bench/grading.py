"""The one grader every benchmark arm uses: is a reply's final answer the gold answer?

The answer is read with `refine_server.policies.answer_extraction.extract_answer`, the extractor the policies vote with,
so a reply is graded on exactly the answer a policy would count it as giving (with the question's options,
so that "Apple." answers C when the question lists "(C) Apple"). Then, by the item's kind:

- number: equal to the gold by math-verify (symbolic, so a gold such as "2\\sqrt{3}" works too); where
  math-verify cannot parse one side, exact equality of the values as the extractor normalises them. A
  percent is a number over 100 (the extractor reads "50%" as 0.5), and a percent question's gold may be
  written either way, so where the question asks for a percentage (or the gold is one, "50%"), the answer
  also counts at 100 times or a hundredth of its value: "50%", "50" and "0.5" all answer "What percent
  ..." with gold 50. A question that only uses a percent ("What is 50% of 80?") gets no such leeway.
- choice: the same option letter as the gold.
- text: equal to the gold after the extractor's text normalisation.
An answer equal (normalised as text) to one of the item's aliases is correct whatever the kind.

Items are dicts: {"id", "question", "kind": "number" | "choice" | "text", "answer": the gold ("12", "C",
"paris"), "options": {"A": text, ...} or null, "aliases": [...]}; items without "options" get the ones
their question lists. math-verify bounds its work with signal.alarm: grade from the main thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import math_verify

from refine_server.policies.answer_extraction import extract_answer, normalise_text, parse_answer, question_options

# A question whose answer is a percentage ("What percent of ...", "the percentage increase", "as a percent");
# not one that merely mentions a percent ("What is 50% of 80?" asks for 40, and 0.4 is wrong).
_ASKS_PERCENT = re.compile(
    r"\bpercentage\b|\b(?:what|which|how many)\s+per\s?cent\b|\b(?:as|in)\s+(?:a\s+)?per\s?cent\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Graded:
    correct: bool
    answer: str | None  # the extracted, normalised answer; None when the reply gives none
    reason: str


def grade(item: dict, text: str) -> Graded:
    """Grade a reply: read its final answer, then compare it with the item's gold."""
    answer = extract_answer(text, item["kind"], options=item_options(item))
    return grade_answer(item, answer.value if answer is not None else None)


def grade_answer(item: dict, answer: str | None) -> Graded:
    """Grade an answer already extracted (an `Answer.value`, such as a majority vote's winner)."""
    if answer is None:
        return Graded(False, None, "no answer")
    gold = str(item["answer"])
    if item["kind"] == "number":
        percent = bool(_ASKS_PERCENT.search(item["question"]) or "%" in gold)
        if _same_number(gold, answer, percent):
            return Graded(True, answer, f"equals {gold}")
    elif item["kind"] == "choice":
        if answer.strip().upper() == gold.strip().upper():
            return Graded(True, answer, f"is option {gold}")
    elif normalise_text(answer) == normalise_text(gold):
        return Graded(True, answer, f"is {gold!r}")
    alias = next((a for a in item.get("aliases") or [] if normalise_text(a) == normalise_text(answer)), None)
    if alias is not None:
        return Graded(True, answer, f"is the alias {alias!r}")
    return Graded(False, answer, f"{answer} is not {gold}")


def item_options(item: dict) -> dict[str, str]:
    """The item's options: its own, else those its question lists ({} for a question without options)."""
    return item.get("options") or question_options(item["question"])


def _same_number(gold: str, answer: str, percent: bool) -> bool:
    value = _fraction(answer)
    if value is None:
        return _verify(gold, answer)
    scales = (1, 100, Fraction(1, 100)) if percent else (1,)
    return any(_verify(gold, str(value * scale)) for scale in scales)


def _verify(gold: str, answer: str) -> bool:
    # The gold is LaTeX or plain maths; math-verify reads LaTeX only between delimiters.
    gold_parsed = math_verify.parse(gold if "$" in gold else f"${gold}$")
    answer_parsed = math_verify.parse(answer)
    if gold_parsed and answer_parsed:
        return math_verify.verify(gold_parsed, answer_parsed)
    gold_value, value = _fraction(gold), _fraction(answer)
    return gold_value is not None and gold_value == value


def _fraction(number: str) -> Fraction | None:
    """The exact value of a number as the extractor reads it ("1,000", "50%", "\\frac{1}{2}"), else None."""
    answer = parse_answer(number, "number")
    return Fraction(answer.value) if answer is not None and answer.kind == "number" else None
