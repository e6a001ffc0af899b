"""policies.answers: an answer read from a candidate's text, normalised so that equal answers compare equal."""

from __future__ import annotations

import pytest

from refine_server.policies.answer_extraction import (
    Answer,
    extract_answer,
    normalise_text,
    parse_answer,
    question_kind,
    question_options,
)


@pytest.mark.parametrize(
    "text",
    [
        "42",
        "42.0",
        "42.00",
        "The answer is 42.",
        "**42**",
        "$42",
        "42 apples",
        "Answer: 42",
        "**Answer:** 42",
        "The answer is $\\boxed{42}$.",
        "The final answer is: 42 apples",
        "We add them up and get 42",
        "The answer is 41. Wait, I made an error: the answer is 42.",
    ],
)
def test_spellings_of_42_are_all_the_number_42(text: str) -> None:
    assert extract_answer(text) == Answer("number", "42")


@pytest.mark.parametrize(
    "text, value",
    [
        ("0.5", "0.5"),
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("The answer is 1,000.", "1000"),
        ("The answer is -3.", "-3"),
        ("The answer is -0.50", "-0.5"),
        ("The answer is 1/3", "1/3"),
        ("The answer is x = 7.", "7"),
        ("The answer is approximately 3.14 metres.", "3.14"),
        ("$\\boxed{\\frac{3}{4}}$", "0.75"),
        ("First 3, then 7, so 12 remain.", "12"),
    ],
)
def test_numbers_are_normalised_exactly(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


@pytest.mark.parametrize(
    "text",
    [
        "(B)",
        "B)",
        "Option B",
        "The answer is B",
        "The answer is (B).",
        "answer is B.",
        "The answer is **B**",
        "The answer is B because the others are wrong.",
        "The correct answer is Option B: 12 apples",
    ],
)
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


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is Paris.", "paris"),
        ("the answer is: **paris**", "paris"),
        ("The answer is the Eiffel Tower!", "eiffel tower"),
        ("Answer: It's blue.", "its blue"),
    ],
)
def test_short_text_answers_are_lowercased_without_punctuation_or_articles(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("text", value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "I don't know how to solve this.",
        "The answer is",
        "The answer is **.",
        "The answer is a long sentence that goes on and on without ever naming anything short.",
    ],
)
def test_no_answer_is_none(text: str) -> None:
    assert extract_answer(text) is None


def test_kinds_are_part_of_equality_and_offsets_are_not() -> None:
    assert Answer("number", "2") != Answer("text", "2")
    assert Answer("number", "2", 0, 1) == Answer("number", "2", 7, 8)
    answer = extract_answer("The total is 42 apples.")
    assert (answer.start, answer.end) == (13, 15)
    assert len({extract_answer("42"), extract_answer("42.0"), extract_answer("(B)")}) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 4.", Answer("number", "4")),
        (" $\\boxed{12}$.", Answer("number", "12")),
        (" (C) because", Answer("choice", "C")),
        (":\n\n**7** apples.", Answer("number", "7")),
        (" 4.\n\nThe answer is 5", Answer("number", "4")),
        (" Paris.", Answer("text", "paris")),
        ("", None),
        # Qwen2.5 restates its conclusion after "Therefore, the final answer is:" rather than starting with it.
        (" Therefore, 1 + 1 = 2.", Answer("number", "2")),
        ("\nThus, the final answer is: 7\n\nSo 8", Answer("number", "7")),
        (" Therefore, I don't know.", None),
    ],
)
def test_parse_answer_reads_the_continuation_of_the_final_step(text: str, expected: Answer | None) -> None:
    assert parse_answer(text) == expected


# ---- the cases a review found wrong ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is not 5, it is 7.", "7"),
        ("The answer is not 5 but 7.", "7"),
        ("The answer is **not** 5, it's 7", "7"),
    ],
)
def test_a_negated_answer_gives_way_to_what_follows_it(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 20, because 4 + 6 = 10 doubled.",
        "The answer is 20 because 4 + 6 = 10 doubled.",
        "The answer is 20 since 4 + 6 = 10, doubled.",
    ],
)
def test_the_equals_rule_stays_inside_the_first_clause(text: str) -> None:
    assert extract_answer(text) == Answer("number", "20")


def test_a_reason_after_a_text_answer_is_not_part_of_it() -> None:
    assert extract_answer("The answer is Paris, because it is the capital.") == Answer("text", "paris")


@pytest.mark.parametrize(
    "text, hint, letter",
    [
        ("(b)", None, "B"),
        ("The answer is (b).", None, "B"),
        ("b)", None, "B"),
        ("option d", None, "D"),
        ("The answer is b.", "choice", "B"),
        ("Not (a), it must be (c).", "choice", "C"),
        ("The answer is (H).", None, "H"),
        ("The answer is J.", None, "J"),
        ("I think it is (F).", "choice", "F"),
    ],
)
def test_option_letters_a_to_j_in_either_case(text: str, hint: str | None, letter: str) -> None:
    assert extract_answer(text, hint) == Answer("choice", letter)


def test_a_lower_case_letter_or_the_word_i_is_a_word_unless_marked_as_an_option() -> None:
    assert extract_answer("The answer is b.") == Answer("text", "b")
    assert extract_answer("The answer is I think 42") == Answer("number", "42")
    assert extract_answer("f(a) = 3") == Answer("number", "3")  # an argument, not option (a)
    assert extract_answer("f(a) = 3", "choice") is None  # and a number names no option


FRUIT = {"A": "Pear", "B": "Plum", "C": "Apple", "D": "none of the above"}


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Apple.", "C"),
        ("The answer is Apple.", "C"),
        ("The answer is an apple, as it is red.", "C"),
        ("The answer is a green apple.", "C"),
        ("The answer is none of the above.", "D"),
        ("The answer is (B) Apple.", "B"),  # the letter it names wins over the text
    ],
)
def test_an_options_text_is_its_letter_when_the_options_are_known(text: str, letter: str) -> None:
    assert extract_answer(text, options=FRUIT) == Answer("choice", letter)
    assert extract_answer(text, "choice", FRUIT) == Answer("choice", letter)


def test_an_option_named_ambiguously_or_negated_is_no_option() -> None:
    options = {"A": "plausible", "B": "implausible", "C": "apple pie", "D": "apple tart"}
    assert extract_answer("The answer is implausible.", options=options) == Answer("choice", "B")
    assert extract_answer("The answer is apple.", options=options) is None  # in both C and D
    assert extract_answer("The answer is not plausible.", options=options) is None
    assert extract_answer("The answer is it is not plausible.", options=options) is None
    assert extract_answer("Apple, plainly.", options=options) is None  # unmarked: only a whole-reply match


def test_a_multiple_choice_question_is_answered_by_an_option_or_not_at_all() -> None:
    """Phrases the bundled model wrote for two-option questions: they name no option, so they cannot vote."""
    options = {"A": "plausible", "B": "implausible"}
    for text in (
        "The answer is answer is.",
        "The final answer is: either true or false.",
        "The answer is Sergio Ramos hit nothing.",
        "The answer is 7.",
        "So it is 7 in the end.",
    ):
        assert extract_answer(text, options=options) is None, text
        assert (
            parse_answer(text.removeprefix("The answer is").removeprefix("The final answer is:"), options=options)
            is None
        ), text
    assert extract_answer("(B) I think. The answer is Sergio Ramos hit nothing.", options=options) == Answer(
        "choice", "B"
    )  # the marked span names no option; the option the reply gave still counts


def test_options_compare_their_numbers_by_value() -> None:
    assert extract_answer("The answer is 1000", options={"A": "$1,000", "B": "$2,000"}) == Answer("choice", "A")


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 50%.", "0.5"),
        ("The answer is 0.5.", "0.5"),
        ("The answer is 50 percent.", "0.5"),
        ("$\\boxed{12.5\\%}$", "0.125"),
        ("The answer is 50.", "50"),
    ],
)
def test_a_percent_is_a_number_over_100(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 1.5e3.", "1500"),
        ("The answer is 2E-2", "0.02"),
        ("The answer is 1.5 x 10^3.", "1500"),
        ("The answer is $1.5 \\times 10^{-3}$.", "0.0015"),
        ("\\tfrac{1}{2}", "0.5"),
        ("$\\dfrac{3}{4}$", "0.75"),
    ],
)
def test_scientific_notation_and_display_fractions(text: str, value: str) -> None:
    assert extract_answer(text) == Answer("number", value)


def test_a_number_in_parentheses_is_an_aside_when_the_reply_has_no_marker() -> None:
    assert extract_answer("300 (3 x 100)") == Answer("number", "300")
    assert extract_answer("The total is 300 (that is, 3 x 100).", "number") == Answer("number", "300")
    assert extract_answer("(3 x 100)") == Answer("number", "100")  # nothing outside: the aside is all there is
    assert extract_answer("So \\(x = 4\\)") == Answer("number", "4")  # LaTeX's \\( \\) is maths, not an aside


@pytest.mark.parametrize(
    "text",
    [
        "The answer is X.",
        "The answer is x",
        "The answer is [answer].",
        "The answer is <answer>.",
        "The answer is your answer.",
        "The answer is ___.",
        "The answer is $\\boxed{X}$.",
        "Answer: [your number]",
    ],
)
def test_placeholders_are_not_answers(text: str) -> None:
    assert extract_answer(text) is None


def test_after_a_placeholder_the_earlier_span_or_the_unmarked_reading_is_tried() -> None:
    assert extract_answer("5 + 7 = 12. The answer is X.") == Answer("number", "12")
    assert extract_answer("The answer is 12. End with: The answer is [answer].") == Answer("number", "12")


@pytest.mark.parametrize(
    "text",
    [
        "The answer is not clear from the text.",
        "The answer is unclear.",
        "The answer is unknown",
        "The answer cannot be determined.",
        "Answer: cannot be determined",
        "The answer is: it depends.",
        "The answer is none of the above.",
        "Answer: I don't know.",
        "The answer is it's not possible to say.",
        "The answer is not 5.",
        "The answer is: no idea, since it is vague.",
    ],
)
def test_hedges_and_refusals_are_not_answers(text: str) -> None:
    assert extract_answer(text) is None


def test_a_hedge_is_the_conclusion_so_an_earlier_number_is_not_taken() -> None:
    assert extract_answer("We have 3 apples and 5 pears. The answer is not clear from the text.") is None
    assert extract_answer("The answer is 12. On reflection, the answer is unknown.") is None


def test_question_options_reads_the_listing() -> None:
    assert question_options("Which is larger?\n(A) 3\n(B) 5") == {"A": "3", "B": "5"}
    assert question_options("Pick one:\nA. red\nB) blue\nC: green") == {"A": "red", "B": "blue", "C": "green"}
    assert question_options("Is it (a) a cat, or (b) a dog?") == {"A": "a cat", "B": "a dog"}
    assert question_options("a) cat\nb) dog") == {"A": "cat", "B": "dog"}
    ten = "Pick:\n" + "\n".join(f"{letter}) option {i}" for i, letter in enumerate("ABCDEFGHIJ"))
    assert list(question_options(ten)) == list("ABCDEFGHIJ")
    # The question's own parts (a), (b) are not its options; the last listing is.
    assert question_options("Parts (a) and (b). Choose: (A) yes, (B) no, or (C) maybe.") == {
        "A": "yes",
        "B": "no",
        "C": "maybe",
    }
    assert question_options("What is 2 + 2?") == {} == question_options("Is (A) right?")


def test_question_kind_recognises_a_to_j_and_lower_case_listings() -> None:
    assert question_kind("Is it (a) a cat or (b) a dog?") == "choice"
    assert question_kind("Q\nF. no\nA. yes\nB. maybe") == "choice"
    assert question_kind("Which is it? (A) one") is None


def test_normalise_text_is_the_text_answers_value() -> None:
    assert normalise_text("The Eiffel Tower!") == "eiffel tower"
    assert normalise_text("  It\u2019s   **blue**.") == "its blue"


def test_parse_answer_takes_options_too() -> None:
    assert parse_answer(" Apple, since it is red.", options=FRUIT) == Answer("choice", "C")
    assert parse_answer(" X.") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Paris.", Answer("text", "paris")),
        ("**Paris**", Answer("text", "paris")),
        ("Paris, the capital.", Answer("text", "paris")),
        ("Paris.\n\nIt is the capital.", None),
        ("Not clear from the text.", None),
        ("42", Answer("text", "42")),
    ],
)
def test_a_text_question_takes_a_one_sentence_reply_as_its_answer(text: str, expected: Answer | None) -> None:
    assert extract_answer(text, "text") == expected
    assert extract_answer(text) != Answer("text", "paris")  # without the hint, unmarked text is no answer


def test_marked_only_skips_the_unmarked_reading() -> None:
    assert extract_answer("3 + 4 = 7", marked_only=True) is None
    assert extract_answer("3 + 4 = 7. The answer is 7.", marked_only=True) == Answer("number", "7")
    assert extract_answer("3 + 4 = 7. The answer is X.", marked_only=True) is None


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A: A\n\nAdam Thielen performed a slide tackle.", "A"),
        ("B: The statement is implausible.", "B"),
        ("A: A", "A"),
        ("b. it is not", "B"),
    ],
)
def test_a_reply_that_opens_with_an_option_chose_it(text: str, letter: str) -> None:
    assert extract_answer(text, "choice", options={"A": "plausible", "B": "implausible"}) == Answer("choice", letter)
