"""policies.answers: an answer read from a candidate's text, normalised so that equal answers compare equal."""

from __future__ import annotations

import pytest

from refine_server.policies.answers import Answer, extract_answer, parse_answer, question_kind


@pytest.mark.parametrize("text", [
    "42", "42.0", "42.00", "The answer is 42.", "**42**", "$42", "42 apples", "Answer: 42", "**Answer:** 42",
    "The answer is $\\boxed{42}$.", "The final answer is: 42 apples", "We add them up and get 42",
    "The answer is 41. Wait, I made an error: the answer is 42.",
])
def test_spellings_of_42_are_all_the_number_42(text: str) -> None:
    assert extract_answer(text) == Answer("number", "42")


@pytest.mark.parametrize("text, value", [
    ("0.5", "0.5"), ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("The answer is 1,000.", "1000"),
    ("The answer is -3.", "-3"), ("The answer is -0.50", "-0.5"), ("The answer is 1/3", "1/3"),
    ("The answer is x = 7.", "7"), ("The answer is approximately 3.14 metres.", "3.14"),
    ("$\\boxed{\\frac{3}{4}}$", "0.75"), ("First 3, then 7, so 12 remain.", "12"),
])
def test_numbers_are_normalised_exactly(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


@pytest.mark.parametrize("text", [
    "(B)", "B)", "Option B", "The answer is B", "The answer is (B).", "answer is B.", "The answer is **B**",
    "The answer is B because the others are wrong.", "The correct answer is Option B: 12 apples",
])
def test_option_letters(text: str) -> None:
    assert extract_answer(text) == Answer("choice", "B")


def test_a_bare_a_before_a_word_is_the_article_unless_the_question_has_options() -> None:
    assert extract_answer("The answer is A.") == Answer("choice", "A")
    assert extract_answer("The answer is A dog.") == Answer("text", "dog")
    assert extract_answer("The answer is A because it is", "choice") == Answer("choice", "A")


def test_a_multiple_choice_question_reads_the_last_option_mentioned() -> None:
    assert extract_answer("Not (A), it must be (C).", "choice") == Answer("choice", "C")
    assert question_kind("Which is larger?\n(A) 3\n(B) 5") == "choice"
    assert question_kind("Pick one:\nA. red\nB. blue") == "choice"
    assert question_kind("What is 2 + 2?") is None


@pytest.mark.parametrize("text, value", [
    ("The answer is Paris.", "paris"), ("the answer is: **paris**", "paris"),
    ("The answer is the Eiffel Tower!", "eiffel tower"), ("Answer: It's blue.", "its blue"),
])
def test_short_text_answers_are_lowercased_without_punctuation_or_articles(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("text", value)


@pytest.mark.parametrize("text", [
    "", "   ", "I don't know how to solve this.", "The answer is", "The answer is **.",
    "The answer is a long sentence that goes on and on without ever naming anything short.",
])
def test_no_answer_is_none(text: str) -> None:
    assert extract_answer(text) is None


def test_kinds_are_part_of_equality_and_offsets_are_not() -> None:
    assert Answer("number", "2") != Answer("text", "2")
    assert Answer("number", "2", 0, 1) == Answer("number", "2", 7, 8)
    answer = extract_answer("The total is 42 apples.")
    assert (answer.start, answer.end) == (13, 15)
    assert len({extract_answer("42"), extract_answer("42.0"), extract_answer("(B)")}) == 2


@pytest.mark.parametrize("text, expected", [
    (" 4.", Answer("number", "4")), (" $\\boxed{12}$.", Answer("number", "12")),
    (" (C) because", Answer("choice", "C")),
    (":\n\n**7** apples.", Answer("number", "7")), (" 4.\n\nThe answer is 5", Answer("number", "4")),
    (" Paris.", Answer("text", "paris")), ("", None),
])
def test_parse_answer_reads_the_continuation_of_the_final_step(text: str, expected: Answer | None) -> None:
    assert parse_answer(text) == expected
