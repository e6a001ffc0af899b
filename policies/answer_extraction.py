"""Answers read out of model text, normalised so that candidates can vote on them.

An answer has a kind and a normalised value, and two answers are the same answer when both are equal:

- **number**: "42", "42.0", "42.00", "$42", "**42**", "42 apples", "1,000", "1/2", "0.5", "\\frac{1}{2}"
  (also \\dfrac, \\tfrac), "1.5e3", "1.5 x 10^3", "50%" and "-3" are numbers; the value is exact (a fraction
  underneath) and written canonically: "42", "1000", "0.5" (a finite decimal), "1/3" (otherwise). A percent is
  a number over 100: "50%" is 0.5, so that "50%" and "0.5" vote together (and "50" does not: a reply that drops
  the sign says something else; whether the gold means 50 or 0.5 is the grader's business).
- **choice**: an option letter A-J, from "(B)", "(b)", "B)", "Option B", "answer is B", "B.". With the
  question's options known (`options`, see `question_options`), an option's text is its letter too: "Apple."
  is C when the question lists "(C) Apple".
- **text**: a short answer (at most `MAX_TEXT_WORDS` words), lower-cased, without punctuation, markup or
  the articles a / an / the (`normalise_text`): "The Eiffel Tower!" is "eiffel tower".

Where the answer is read from, in this order (`extract_answer`):
1. A marked span: `\\boxed{...}` or what follows "answer is" / "answer:" / "answer =" up to the end of the
   sentence. The LAST marked span that parses wins: models restate and correct themselves, and the
   conclusion comes last.
2. Without a marker: a reply that is only an option ("(B)") or only an option's text; for a multiple-choice
   question (`kind_hint="choice"`), the last option mentioned; for a text question (`kind_hint="text"`), a
   reply that is a single sentence without a marker ("Paris."); else the last number in the text outside parentheses
   ("300 (3 x 100)" is 300: a parenthesis is an aside, its working or a unit).
3. Otherwise there is no answer (None). Other free text without a marker is never taken as an answer: string
   equality between two free-form replies says nothing about whether they agree.

Inside a span only its first clause counts: "not X, it is Y" is Y, and the span ends at ", " or ";" or a
word such as "because", "since", "so", "which" ("20, because 4 + 6 = 10 doubled" is 20). Then, in order: an
option letter; an option's text; a non-answer; a number among the first words (after the last "=", so
"x = 7" is 7); short text. A bare "A" or "I" followed by a word is a word ("the answer is A dog", "I think"),
and a bare lower-case letter is a letter only when it stands alone ("b."), unless the question lists options.
`kind_hint` narrows the reading: "choice" (the question lists options, see `question_kind`; implied by
`options`) takes a leading capital letter and the last option mentioned, and only an option: a number or a
phrase that names none is no answer (it cannot be right, and two such replies agreeing says nothing, so they
must not vote); "number" never reads a letter;
"text" reads neither letters nor numbers. `parse_answer` reads a text that starts with the answer itself,
such as the continuation of "Therefore, the final answer is".

Non-answers are never answers, so that they cannot vote:
- a placeholder, the template a model was asked to fill and copied instead: "X", "[answer]", "<answer>",
  "your answer", "___" (`PLACEHOLDERS`, or any bracketed word without digits). It is skipped: the span before
  it, or the unmarked reading, may still hold the answer.
- a hedge or refusal: a span that starts with "not" (with no "..., it is Y" after it), "unclear", "unknown",
  "cannot", "insufficient", "no answer", "no idea", "none of the above", "I don't know", "it depends", ...
  (`_HEDGE`). It is the reply's conclusion that it has no answer, so the whole reply has none: an earlier
  number it gave up on is not its answer. An option whose text is such a phrase ("(E) none of the above")
  is still that option.

Every `Answer` also records where it was found (`start`, `end`, character offsets), so a caller can find
the tokens that produced it; the offsets take no part in equality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Literal

AnswerKind = Literal["number", "choice", "text"]

# A "short answer" longer than this is a sentence, not an answer two candidates could agree on verbatim.
MAX_TEXT_WORDS = 8
# "approximately 3.5", "a total of 42": a number this many words into the span still is the answer.
MAX_WORDS_BEFORE_NUMBER = 3
# Normalised spans that are the template of an answer rather than one ("The answer is X.").
PLACEHOLDERS = frozenset(
    {"x", "answer", "your answer", "final answer", "your final answer", "answer here", "your answer here"}
)


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
# "not 5, it is 7" / "not 5 but 7": the negated part, up to what the span says instead.
_NEGATED = re.compile(
    rf"(?:{_MARKUP})*not\b[^,;\n]*?(?:[,;]\s*|\s+(?=but\b))(?:but\s+)?"
    r"(?:(?:it|that)\s+(?:is|was)\s+|it['\u2019]s\s+|rather\s+|instead\s+)?",
    re.IGNORECASE,
)
# Where the first clause of a span ends: what follows is a reason or a restatement, not the answer.
_CLAUSE_END = re.compile(
    r",\s|;|\s\u2014|\s(?:because|since|as|so|which|where|given|but|while|when|if)\b", re.IGNORECASE
)
_CHOICE = re.compile(
    rf"^(?:{_MARKUP})*"
    r"(?:(?P<option>(?i:option|choice))\s+)?"
    r"(?P<open>\()?(?P<letter>[A-Ja-j])(?P<close>\))?"
    r"(?![A-Za-z0-9])"
    rf"(?P<alone>(?:{_MARKUP})*(?:$|[.,:;!?]))?"
)
_CHOICE_MENTION = re.compile(
    r"(?<![A-Za-z0-9\\])\((?P<a>[A-Ja-j])\)|\b(?P<b>[A-J])\)|(?i:option|choice)\s+(?P<c>[A-Ja-j])\b"
)
# How a question lists its options: "(A)" or "(a)" anywhere; "A." "A)" "A:" or "a)" at the start of a line.
_OPTION_MARK = re.compile(
    r"(?<![\w(\\])\((?P<p>[A-Ja-j])\)|^[ \t]*(?P<u>[A-J])[.):][ \t]|^[ \t]*(?P<l>[a-j])\)[ \t]", re.MULTILINE
)
_NUMBER = re.compile(
    r"(?:(?P<fsign>[-\u2212])?\\[dt]?frac\{(?P<fnum>\d+)\}\{(?P<fden>\d*[1-9]\d*)\}"
    r"|(?P<sign>(?<![\w.])[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.(?P<dec>\d+))?"
    r"(?(int)|(?(dec)|(?!)))"  # at least one digit: an integer part or a decimal part
    r"(?:[eE](?P<exp>[-+\u2212]?\d+)(?!\w|\.\d)"
    r"|\s*(?:[x\u00d7*]|\\times|\\cdot)\s*10\^\{?(?P<exp10>[-+\u2212]?\d+)\}?)?"
    r"(?:\s*/\s*(?P<den>\d+))?)"
    r"(?P<percent>\s*(?:\\?%|percent\b))?"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_RESTATEMENT = re.compile(r"(?i:therefore|thus|hence),\s*")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
# On normalised text (lower case, no punctuation, no apostrophes, no articles).
_HEDGE = re.compile(
    r"^(?:it is |its |this is |i am |im |i )?(?:not|unclear|unknown|unsure|undetermined|indeterminate|cannot|"
    r"can not|cant|impossible to|insufficient|no answer|no idea|none of above|dont know|do not know|it depends)\b"
)
_BRACKETED_WORDS = re.compile(r"\s*(?:\[[^\]\d]*[A-Za-z]{2}[^\]\d]*\]|<[^>\d]*[A-Za-z]{2}[^>\d]*>)\s*")
_NEGATION_WORD = re.compile(
    r"\b(?:not|no|never|neither|nor|cannot|cant|isnt|arent|wasnt|werent|dont|doesnt|"
    r"didnt|wont|wouldnt|couldnt|shouldnt)\b"
)


# ---- public API ------------------------------------------------------------------------------------------


def extract_answer(
    text: str,
    kind_hint: AnswerKind | None = None,
    options: Mapping[str, str] | None = None,
    *,
    marked_only: bool = False,
) -> Answer | None:
    """The answer a whole reply gives, or None when it gives none (see the module docstring for the rules).

    `options`: the question's options (letter -> text, as `question_options` returns them), so that a reply
    naming an option by its text is read as that option's letter. `marked_only`: read marked spans only (step
    1), for a caller with a better way to get an answer from a reply that marks none.
    """
    kind_hint = "choice" if options and kind_hint is None else kind_hint
    for start, end in sorted(_marked_spans(text), reverse=True):
        answer = _parse_span(text, start, end, kind_hint, options)
        if answer is not None:
            return answer
        if _HEDGE.match(normalise_text(text[start:end])):
            return None
    return None if marked_only else _unmarked_answer(text, kind_hint, options)


def parse_answer(
    text: str, kind_hint: AnswerKind | None = None, options: Mapping[str, str] | None = None
) -> Answer | None:
    """The answer a text starts with, read up to the end of its first sentence (" 42." -> 42).

    Leading blanks and a colon are skipped (":\\n\\n42" -> 42). A \\boxed{...} that opens within that sentence
    is read instead (" $\\boxed{42}$" -> 42). A sentence that opens with "Therefore," (or "Thus,", "Hence,")
    restates the conclusion instead of starting with the answer, and is read as a reply is (" Therefore,
    1 + 1 = 2." -> 2): Qwen2.5 continues the final step that way, and its first word is no answer.
    `options` as for `extract_answer`.
    """
    kind_hint = "choice" if options and kind_hint is None else kind_hint
    leading = re.match(r"[\s:]*", text)
    assert leading is not None  # the pattern matches the empty string
    start = leading.end()
    restated = _RESTATEMENT.match(text, start)
    if restated:
        return extract_answer(text[restated.end() : _sentence_end(text, restated.end())], kind_hint, options)
    end = _sentence_end(text, start)
    boxed = next((span for span in _boxed_spans(text) if span[0] <= end), None)
    start, end = boxed or (start, end)
    return _parse_span(text, start, end, kind_hint, options)


def question_options(question: str) -> dict[str, str]:
    """The options a question lists: upper-case letter -> the option's text, {} when it lists none.

    Options are "(A) text", "(a) text" (anywhere, so also inline: "(A) 3 (B) 5"), or "A. text", "A) text",
    "A: text", "a) text" at the start of a line; an option's text runs to the next option or the end of its
    line. A listing is a run of consecutive letters from A, at least A and B; of several runs (a question
    may refer to its own parts as (a), (b)), the longest and, among those, the last.
    """
    runs: list[list[re.Match[str]]] = []
    for m in _OPTION_MARK.finditer(question):
        letter = _mark_letter(m)
        if letter == "A":
            runs.append([m])
        elif runs and ord(letter) == ord(_mark_letter(runs[-1][-1])) + 1:
            runs[-1].append(m)
    listing: list[re.Match[str]] = max(reversed(runs), key=len, default=[])
    if len(listing) < 2:
        return {}
    options = {}
    for m, after in zip(listing, [*listing[1:], None]):
        line_end = question.find("\n", m.end())
        end = min(e for e in (line_end, after.start() if after else -1, len(question)) if e >= 0)
        # An inline option ends where the next begins: drop the ", or" between them and the question's own "?".
        options[_mark_letter(m)] = re.sub(r"(?:[\s,;.?]|\bor\b)+$", "", question[m.end() : end].strip())
    return options


def question_kind(question: str) -> AnswerKind | None:
    """ "choice" when the question lists options (see `question_options`), else None: the hint for extraction."""
    return "choice" if question_options(question) else None


def normalise_text(text: str) -> str:
    """A text answer's value: lower case, without LaTeX commands, punctuation, apostrophes or articles."""
    text = _LATEX_COMMAND.sub(" ", text).lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


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


def _first_clause(text: str, start: int, end: int) -> tuple[int, int]:
    """The part of a span that states the answer: after a negated part, before a reason or restatement."""
    negated = _NEGATED.match(text, start, end)
    if negated and text[negated.end() : end].strip():
        start = negated.end()
    cut = _CLAUSE_END.search(text, start, end)
    return start, cut.start() if cut else end


def _parse_span(
    text: str, start: int, end: int, kind_hint: AnswerKind | None, options: Mapping[str, str] | None
) -> Answer | None:
    start, end = _first_clause(text, start, end)
    span = text[start:end]
    stripped = span.strip()
    s_start = start + span.find(stripped)
    s_end = s_start + len(stripped)
    choice = _CHOICE.match(span) if kind_hint not in ("number", "text") else None
    if choice and _is_option(choice, kind_hint, leading=False):
        return Answer("choice", choice["letter"].upper(), start + choice.start("letter"), start + choice.end("letter"))
    if options and (letter := _option_for(span, options, exact=True)):
        return Answer("choice", letter, s_start, s_end)
    value = normalise_text(span)
    if _HEDGE.match(value) or value in PLACEHOLDERS or _BRACKETED_WORDS.fullmatch(span):
        return None
    if options and (letter := _option_for(span, options, exact=False)):
        return Answer("choice", letter, s_start, s_end)
    if choice and _is_option(choice, kind_hint, leading=True):
        return Answer("choice", choice["letter"], start + choice.start("letter"), start + choice.end("letter"))
    if kind_hint == "choice":  # a multiple-choice question is answered by an option, and this span names none
        return None
    if kind_hint != "text":
        number = _leading_number(span)
        if number is not None:
            number_value, (n_start, n_end) = number
            return Answer("number", number_value, start + n_start, start + n_end)
    if value and len(value.split()) <= MAX_TEXT_WORDS:
        return Answer("text", value, s_start, s_end)
    return None


def _is_option(m: re.Match, kind_hint: AnswerKind | None, *, leading: bool) -> bool:
    """Whether a letter that opens a span is an option letter rather than a word.

    Always when in parentheses or after "option"; alone ("B", "B."), an upper-case letter, or any letter for
    a multiple-choice question. `leading`: also an upper-case letter followed by more words ("B because"),
    except the words "A" and "I"; for a multiple-choice question "A" counts too.
    """
    letter = m["letter"]
    if any(m.group(g) is not None for g in ("option", "open", "close")):
        return True
    if m["alone"] is not None:
        return letter.isupper() or kind_hint == "choice"
    if not leading or not letter.isupper():
        return False
    return letter != "I" and (letter != "A" or kind_hint == "choice")


def _option_for(span: str, options: Mapping[str, str], *, exact: bool) -> str | None:
    """The one option whose text the span gives: equal after normalisation or, unless `exact`, contained in
    it or containing it as whole words. A span with a negation never contains an option ("not plausible")."""
    key = _option_key(span)
    if not key:
        return None
    keys = {letter.upper(): _option_key(text) for letter, text in options.items()}
    found = [letter for letter, k in keys.items() if k == key]
    if not found and not exact and not _NEGATION_WORD.search(key):
        found = [letter for letter, k in keys.items() if k and (f" {k} " in f" {key} " or f" {key} " in f" {k} ")]
    return found[0] if len(found) == 1 else None


def _option_key(text: str) -> str:
    """Normalised text with its numbers written canonically, so that "$1,000" and "1000" are the same option."""
    return normalise_text(_NUMBER.sub(lambda m: f" {_number_value(m)} ", text))


def _mark_letter(m: re.Match) -> str:
    return (m["p"] or m["u"] or m["l"]).upper()


def _unmarked_answer(text: str, kind_hint: AnswerKind | None, options: Mapping[str, str] | None) -> Answer | None:
    stripped = text.strip()
    offset = text.find(stripped)
    bare = _CHOICE.fullmatch(stripped) if kind_hint not in ("number", "text") else None
    bare = bare if bare and _is_option(bare, kind_hint, leading=False) else None
    if options and (letter := _option_for(stripped, options, exact=True)):
        return Answer("choice", letter, offset, offset + len(stripped))
    if kind_hint == "choice" or bare:
        mentions = list(_CHOICE_MENTION.finditer(text))
        if mentions:
            m = mentions[-1]
            group = next(g for g in ("a", "b", "c") if m.group(g))
            return Answer("choice", m.group(group).upper(), m.start(group), m.end(group))
        # A reply that opens with an option ("B: it is implausible", "A) 04/22/2016") chose that option.
        opening = bare or (_CHOICE.match(stripped) if kind_hint == "choice" else None)
        if opening and _is_option(opening, kind_hint, leading=True):
            return Answer(
                "choice", opening["letter"].upper(), offset + opening.start("letter"), offset + opening.end("letter")
            )
    if kind_hint == "choice":
        return None
    if kind_hint == "text":
        end = _sentence_end(text, offset)
        one_sentence = not text[end:].strip(" \t\n.!?*") and not _marked_spans(text)
        return _parse_span(text, offset, end, kind_hint, options) if one_sentence else None
    numbers = list(_numbers(text))
    asides = _parenthesised(text)
    outside = [n for n in numbers if not any(a <= n[1][0] < b for a, b in asides)]
    if not (outside or numbers):
        return None
    value, (start, end) = (outside or numbers)[-1]
    return Answer("number", value, start, end)


def _parenthesised(text: str) -> list[tuple[int, int]]:
    """The outermost ( ... ) of a text; not LaTeX's \\( \\), which delimits maths rather than an aside."""
    spans, depth, opened = [], 0, 0
    for i, char in enumerate(text):
        if char == "(" and text[i - 1 : i] != "\\":
            opened = i if depth == 0 else opened
            depth += 1
        elif char == ")" and depth and text[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                spans.append((opened, i + 1))
    return spans


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
        exponent = m["exp"] or m["exp10"]
        if exponent is not None:
            value *= Fraction(10) ** int(exponent.replace("\u2212", "-"))
        if m["den"] is not None and int(m["den"]) != 0:
            value /= int(m["den"])
        negative = m["sign"] is not None
    if m["percent"] is not None:
        value /= 100
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
