"""bench/grading.py: one grader for every arm, reading answers with the policies' own extractor."""

from __future__ import annotations

import pytest
from grading import Graded, grade, grade_answer

NUMBER = {"id": "n", "question": "What is 3 x 100?", "kind": "number", "answer": "300", "options": None, "aliases": []}
CHOICE = {
    "id": "c",
    "question": "Which is a fruit?\n(A) Carrot\n(B) Leek\n(C) Apple",
    "kind": "choice",
    "answer": "C",
    "options": {"A": "Carrot", "B": "Leek", "C": "Apple"},
    "aliases": [],
}
TEXT = {
    "id": "t",
    "question": "What is the capital of Italy? Answer with one word.",
    "kind": "text",
    "answer": "Rome",
    "options": None,
    "aliases": ["Roma"],
}


@pytest.mark.parametrize(
    "text",
    [
        "300 (3 x 100)",
        "300",
        "The answer is 300.",
        "3 x 100 = 300",
        "$\\boxed{300}$",
        "The answer is 3e2.",
        "The answer is 300, because 3 x 100 = 300.",
        "The answer is 300.00",
        "The answer is not 30, it is 300.",
    ],
)
def test_numbers(text: str) -> None:
    assert grade(NUMBER, text) == Graded(True, "300", "equals 300")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is 30.", "30"),
        ("3 x 100 = 300, minus 1 is 299", "299"),
        ("The answer is 301 (not 300).", "301"),
    ],
)
def test_wrong_numbers(text: str, answer: str) -> None:
    assert grade(NUMBER, text) == Graded(False, answer, f"{answer} is not 300")


def test_a_symbolic_gold_is_compared_by_math_verify() -> None:
    item = {**NUMBER, "answer": "\\frac{1}{2}"}
    assert grade(item, "The answer is 0.5").correct
    assert grade(item, "The answer is 2/4").correct
    assert not grade(item, "The answer is 0.25").correct
    assert grade({**NUMBER, "answer": "1,500"}, "The answer is 1.5e3").correct


def test_a_percentage_question_takes_either_scale_and_other_questions_do_not() -> None:
    asks = {**NUMBER, "question": "What percent of 80 is 40?", "answer": "50"}
    for text in ("The answer is 50%.", "The answer is 50.", "The answer is 0.5."):
        assert grade(asks, text).correct, text
    assert not grade(asks, "The answer is 5%.").correct
    assert grade({**asks, "answer": "0.5"}, "The answer is 50%.").correct
    uses = {**NUMBER, "question": "What is 50% of 80?", "answer": "40"}
    assert grade(uses, "The answer is 40.").correct
    assert not grade(uses, "The answer is 0.4.").correct


@pytest.mark.parametrize(
    "text",
    [
        "A) Carrot is a root. The fruit here is the apple, so the answer is (C).",
        "(C)",
        "(c)",
        "The answer is C.",
        "Apple.",
        "The answer is Apple.",
        "The answer is an apple, since it grows on trees.",
        "C) Apple",
    ],
)
def test_choices_are_graded_by_letter(text: str) -> None:
    assert grade(CHOICE, text) == Graded(True, "C", "is option C")


def test_a_choice_item_without_options_uses_those_its_question_lists() -> None:
    assert grade({**CHOICE, "options": None}, "Apple.").correct
    assert grade({**CHOICE, "options": None}, "A) Carrot\nB) Leek\nC) Apple\n\nThe answer is A.") == Graded(
        False, "A", "A is not C"
    )


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Rome.", "rome"),
        ("The answer is Rome.", "rome"),
        ("Roma", "roma"),
        ("The answer is **rome**!", "rome"),
    ],
)
def test_text_is_graded_by_normalised_equality_with_the_gold_or_an_alias(text: str, answer: str) -> None:
    graded = grade(TEXT, text)
    assert graded.correct and graded.answer == answer


def test_wrong_text() -> None:
    assert grade(TEXT, "Milan.") == Graded(False, "milan", "milan is not Rome")


@pytest.mark.parametrize("item", [NUMBER, CHOICE, TEXT])
@pytest.mark.parametrize(
    "text",
    [
        "",
        "I am not sure.",
        "The answer is X.",
        "The answer is [answer].",
        "The answer is your answer.",
        "The answer is <answer>.",
        "The answer is ___.",
        "The answer is not clear from the text.",
    ],
)
def test_placeholders_hedges_and_silence_are_no_answer(item: dict, text: str) -> None:
    assert grade(item, text) == Graded(False, None, "no answer")


def test_grade_answer_grades_an_extracted_answer() -> None:
    assert grade_answer(NUMBER, "300").correct
    assert grade_answer(NUMBER, "3e2").correct
    assert not grade_answer(NUMBER, "30").correct
    assert grade_answer(CHOICE, "C").correct
    assert not grade_answer(CHOICE, "A").correct
    assert grade_answer(TEXT, "roma") == Graded(True, "roma", "is the alias 'Roma'")
    assert grade_answer(TEXT, None) == Graded(False, None, "no answer")


def test_an_answer_of_another_kind_is_wrong() -> None:
    assert grade(CHOICE, "The answer is 300.") == Graded(False, None, "no answer")  # names no option
    assert grade(NUMBER, "The answer is three hundred.") == Graded(False, "three hundred", "three hundred is not 300")
    assert grade({**NUMBER, "aliases": ["three hundred"]}, "The answer is three hundred.").correct
