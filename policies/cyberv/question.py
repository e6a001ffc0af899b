"""The question cyberv answers, read from the client's request, and the prompts built around it.

A chat request's last user message is the question and the messages before it (system prompt, history) go into
every engine call; a completions request's prompt (one string) is the question. The question's options, where
it lists them, make its answers choices (`answer_extraction.question_options`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from refine_server.policies.answer_extraction import Answer, extract_answer, parse_answer, question_options
from refine_server.policies.base import PolicyRequestError

if TYPE_CHECKING:
    from refine_server.policies.cyberv.params import CyberVParams
    from refine_server.policies.request import ClientRequest


@functools.cache
def _template(name: str) -> str:
    """A prompt from prompts/ (package data), read once; the file's final newline is not part of it."""
    return (files("refine_server.policies.cyberv") / "prompts" / name).read_text(encoding="utf-8").removesuffix("\n")


def fill_prompt(name: str, **fields: str) -> str:
    """The prompt `name` of prompts/ with its fields filled in."""
    return _template(name).format(**fields)


@dataclass(frozen=True)
class Question:
    """What cyberv answers, and what it keeps of the client's request."""

    history: list[dict[str, Any]]  # chat messages before the question
    text: str
    max_tokens: int | None
    options: dict[str, str]  # the options a multiple-choice question lists, by letter (empty: none)

    @property
    def answer_form(self) -> str:
        """How the final-answer step asks for the answer, by the question's kind."""
        return "the letter of the option I chose" if self.options else "as briefly as possible"

    # The answers of texts about this question; its options (if any) make them choices, and an option's text
    # reads as its letter.

    def read(self, text: str) -> Answer | None:
        """A candidate text's own marked answer ("the answer is 7", "\\boxed{7}")."""
        return extract_answer(text, options=self.options, marked_only=True)

    def parse(self, text: str) -> Answer | None:
        """The answer a text starts with (a bare direct answer, the final step's continuation)."""
        return parse_answer(text, options=self.options)

    def extract(self, text: str) -> Answer | None:
        """A text's answer, marked or not (the last resort)."""
        return extract_answer(text, options=self.options)

    def messages(self, content: str) -> list[dict[str, Any]]:
        """The conversation with `content` (a prompt built around the question) as its last user message."""
        return [*self.history, {"role": "user", "content": content}]

    def cap(self, tokens: int) -> int:
        """A generation budget, capped by the client's max_tokens: whatever cyberv returns respects it."""
        return min(tokens, self.max_tokens) if self.max_tokens else tokens


def read_question(request: ClientRequest) -> Question:
    """The question of a chat or completions request; a request cyberv cannot answer is a 400."""
    request.require_one_choice("cyberv", "returns one chosen answer")
    if request.endpoint == "chat":
        history, text = request.question("cyberv")
    else:
        if not isinstance(request.prompt, str):
            raise PolicyRequestError("policy cyberv needs the prompt as one string (not a list or token ids)", "prompt")
        history, text = [], request.prompt
    if not text.strip():
        raise PolicyRequestError(
            "policy cyberv needs a question, and this one has no text",
            "messages" if request.endpoint == "chat" else "prompt",
        )
    return Question(history=history, text=text, max_tokens=request.max_tokens, options=question_options(text))


def direct_call(question: Question, params: CyberVParams) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Candidate 0's engine call: the direct prompt, greedy, within the reasoning budget (the sensor's fields
    are added by whoever makes the call). `auto` makes this call itself and hands its generation over."""
    messages = question.messages(fill_prompt("direct.txt", question=question.text))
    return messages, {"temperature": 0.0, "max_tokens": question.cap(params.max_reasoning_tokens)}
