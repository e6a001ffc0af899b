"""Answers read out of model text, normalised so that candidates can vote on them.

An answer has a kind and a normalised value, and two answers are the same answer when both are equal:

- **number**: "42", "42.0", "42.00", "$42", "**42**", "42 apples", "1,000", "1/2", "0.5", "\\frac{1}{2}" and
  "-3" are numbers; the value is exact (a fraction underneath) and written canonically: "42", "1000",
  "0.5" (a finite decimal), "1/3" (otherwise).
- **choice**: an option letter A-E, from "(B)", "B)", "Option B", "answer is B", "B.".
- **text**: a short answer (at most `MAX_TEXT_WORDS` words), lower-cased, without punctuation, markup or
  the articles a / an / the: "The Eiffel Tower!" is "eiffel tower".

Where the answer is read from, in this order (`extract_answer`):
1. A marked span: `\\boxed{...}` or what follows "answer is" / "answer:" / "answer =" up to the end of the
   sentence. The LAST marked span that parses wins: models restate and correct themselves, and the
   conclusion comes last.
2. Without a marker: for a multiple-choice question (`kind_hint="choice"`) or a reply that is only an option
   ("(B)"), the last option mentioned; else the last number in the text.
3. Otherwise there is no answer (None). Free text without a marker is never taken as an answer: string
   equality between two free-form replies says nothing about whether they agree.

Inside a span: an option letter first, then a number among the first words (after the last "=", so "x = 7"
is 7), then short text. A bare "A" followed by a word is the article ("the answer is A dog"), unless the
question lists options. `kind_hint` narrows the reading: "choice" (the question lists options, see
`question_kind`) takes any leading letter and the last option mentioned; "number" never reads a letter;
"text" reads neither letters nor numbers. `parse_answer` reads a text that starts with
the answer itself, such as the continuation of "Therefore, the final answer is".

Every `Answer` also records where it was found (`start`, `end`, character offsets), so a caller can find
the tokens that produced it; the offsets take no part in equality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Literal

AnswerKind = Literal["number", "choice", "text"]

# A "short answer" longer than this is a sentence, not an answer two candidates could agree on verbatim.
MAX_TEXT_WORDS = 8
# "approximately 3.5", "a total of 42": a number this many words into the span still is the answer.
MAX_WORDS_BEFORE_NUMBER = 3


@dataclass(frozen=True)
class Answer:
    kind: AnswerKind
    value: str
    start: int = field(default=0, compare=False)
    end: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return self.value


# ---- patterns --------------------------------------------------------------------------------------------

# Markup a model wraps answers in: bold/italic, dollar signs, inline maths delimiters, backticks.
_MARKUP = r"[\s*_$`]|\\[()\[\]]"
_MARKER = re.compile(r"\banswer\b[*_\s]*(?:is\b|:|=)[*_\s:]*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{")
# A sentence ends at a newline, or at . ! ? ; followed by a space, markup or the end (not "4.5").
_SENTENCE_END = re.compile(r"\n|[.!?;](?=[\s*_$`]|\\[)\]]|$)")
_CHOICE = re.compile(
    rf"^(?:{_MARKUP})*"
    r"(?:(?P<option>(?i:option|choice))\s+)?"
    r"(?P<open>\()?(?P<letter>[A-E])(?P<close>\))?"
    r"(?![A-Za-z0-9])"
    rf"(?P<alone>(?:{_MARKUP})*(?:$|[.,:;!?]))?"
)
_CHOICE_MENTION = re.compile(r"\((?P<a>[A-E])\)|\b(?P<b>[A-E])\)|(?i:option|choice)\s+(?P<c>[A-E])\b")
_NUMBER = re.compile(
    r"(?P<fsign>[-\u2212])?\\d?frac\{(?P<fnum>\d+)\}\{(?P<fden>\d*[1-9]\d*)\}"
    r"|(?P<sign>(?<![\w.])[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.(?P<dec>\d+))?"
    r"(?(int)|(?(dec)|(?!)))"  # at least one digit: an integer part or a decimal part
    r"(?:\s*/\s*(?P<den>\d+))?"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_QUESTION_OPTION = re.compile(r"\(([A-E])\)|^\s*([A-E])[.):]\s", re.MULTILINE)


# ---- public API ------------------------------------------------------------------------------------------

def extract_answer(text: str, kind_hint: AnswerKind | None = None) -> Answer | None:
    """The answer a whole reply gives, or None when it gives none (see the module docstring for the rules)."""
    for start, end in sorted(_marked_spans(text), reverse=True):
        answer = _parse_span(text, start, end, kind_hint)
        if answer is not None:
            return answer
    return _unmarked_answer(text, kind_hint)


def parse_answer(text: str, kind_hint: AnswerKind | None = None) -> Answer | None:
    """The answer a text starts with, read up to the end of its first sentence (" 42." -> 42).

    Leading blanks and a colon are skipped (":\\n\\n42" -> 42). A \\boxed{...} that opens within that sentence
    is read instead (" $\\boxed{42}$" -> 42).
    """
    start = re.match(r"[\s:]*", text).end()
    end = _sentence_end(text, start)
    boxed = next((span for span in _boxed_spans(text) if span[0] <= end), None)
    start, end = boxed or (start, end)
    return _parse_span(text, start, end, kind_hint)


def question_kind(question: str) -> AnswerKind | None:
    """"choice" when the question lists options (at least A and B), else None: the hint for extraction."""
    letters = {a or b for a, b in _QUESTION_OPTION.findall(question)}
    return "choice" if {"A", "B"} <= letters else None


# ---- spans -----------------------------------------------------------------------------------------------

def _marked_spans(text: str) -> list[tuple[int, int]]:
    spans = [(m.end(), _sentence_end(text, m.end())) for m in _MARKER.finditer(text)]
    return spans + list(_boxed_spans(text))


def _boxed_spans(text: str) -> Iterator[tuple[int, int]]:
    """The contents of every \\boxed{...}, braces balanced."""
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            yield m.end(), i - 1


def _sentence_end(text: str, start: int) -> int:
    m = _SENTENCE_END.search(text, start)
    return m.start() if m else len(text)


def _parse_span(text: str, start: int, end: int, kind_hint: AnswerKind | None) -> Answer | None:
    span = text[start:end]
    if kind_hint not in ("number", "text"):
        choice = _CHOICE.match(span)
        if choice and (kind_hint == "choice" or _clearly_an_option(choice)):
            return Answer("choice", choice["letter"], start + choice.start("letter"), start + choice.end("letter"))
    if kind_hint != "text":
        number = _leading_number(span)
        if number is not None:
            value, (n_start, n_end) = number
            return Answer("number", value, start + n_start, start + n_end)
    value = _normalise_text(span)
    if value and len(value.split()) <= MAX_TEXT_WORDS:
        stripped = span.strip()
        offset = start + span.find(stripped)
        return Answer("text", value, offset, offset + len(stripped))
    return None


def _clearly_an_option(m: re.Match) -> bool:
    """A letter in parentheses, after "option", or alone; a bare "A" before a word is the article ("A dog")."""
    return any(m.group(g) is not None for g in ("option", "open", "close", "alone")) or m["letter"] != "A"


def _unmarked_answer(text: str, kind_hint: AnswerKind | None) -> Answer | None:
    bare = _CHOICE.fullmatch(text.strip())
    if kind_hint == "choice" or (bare and kind_hint is None):
        mentions = list(_CHOICE_MENTION.finditer(text))
        if mentions:
            m = mentions[-1]
            group = next(g for g in ("a", "b", "c") if m.group(g))
            return Answer("choice", m.group(group), m.start(group), m.end(group))
        if bare:
            offset = text.find(text.strip())
            return Answer("choice", bare["letter"], offset + bare.start("letter"), offset + bare.end("letter"))
    if kind_hint == "text":
        return None
    numbers = list(_numbers(text))
    if not numbers:
        return None
    value, (start, end) = numbers[-1]
    return Answer("number", value, start, end)


# ---- numbers ---------------------------------------------------------------------------------------------

def _numbers(text: str) -> Iterator[tuple[str, tuple[int, int]]]:
    """Every number in the text: (canonical value, (start, end))."""
    for m in _NUMBER.finditer(text):
        yield _number_value(m), m.span()


def _leading_number(span: str) -> tuple[str, tuple[int, int]] | None:
    """The first number of a span if it comes within its first words (after the last "=", if any)."""
    offset = span.rfind("=") + 1
    tail = span[offset:]
    first = next(_numbers(tail), None)
    if first is None:
        return None
    value, (start, end) = first
    if len(re.sub(r"\\[A-Za-z]+|[{}]", " ", tail[:start]).split()) > MAX_WORDS_BEFORE_NUMBER:
        return None
    return value, (offset + start, offset + end)


def _number_value(m: re.Match) -> str:
    if m["fnum"] is not None:
        value = Fraction(int(m["fnum"]), int(m["fden"]))
        negative = m["fsign"] is not None
    else:
        whole = (m["int"] or "0").replace(",", "")
        value = Fraction(Decimal(f"{whole}.{m['dec'] or '0'}"))
        if m["den"] is not None and int(m["den"]) != 0:
            value /= int(m["den"])
        negative = m["sign"] is not None
    return _format_number(-value if negative else value)


def _format_number(value: Fraction) -> str:
    """Integers as integers, finite decimals as exact plain decimals, anything else as p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    rest, exponents = value.denominator, {2: 0, 5: 0}
    for factor in exponents:
        while rest % factor == 0:
            rest //= factor
            exponents[factor] += 1
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(exponents.values())
    digits = str(abs(value.numerator) * (10**places // value.denominator)).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


# ---- text ------------------------------------------------------------------------------------------------

def _normalise_text(span: str) -> str:
    text = _LATEX_COMMAND.sub(" ", span).lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())
