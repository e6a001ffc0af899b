"""OpenAI response and chunk bodies for a policy that writes its own answer (one chosen choice) instead of
relaying the engine's."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from refine_server.policies.request import Endpoint

WORDS_PER_CHUNK = 4  # streaming a decided answer: words per content chunk


def split_for_streaming(text: str) -> list[str]:
    """Pieces of WORDS_PER_CHUNK words that join back to exactly `text`: a policy that decides its answer
    before sending it streams it in these."""
    return re.findall(rf"\s*(?:\S+\s*){{1,{WORDS_PER_CHUNK}}}", text) or [text]


@dataclass
class AnswerShapes:
    """The OpenAI bodies of one answer (a single choice) for a policy that writes its own response: the
    whole response, and the stream's chunks."""

    endpoint: Endpoint
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.endpoint == "chat" else "cmpl-") + uuid.uuid4().hex

    def response(self, text: str, finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        if self.endpoint == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def piece(self, text: str, first: bool) -> dict[str, Any]:
        """A chunk carrying the next piece of text (a chat stream's first chunk also carries the role)."""
        if self.endpoint == "chat":
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return self.chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
        return self.chunk([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def finish(self, finish_reason: str | None) -> dict[str, Any]:
        last: dict[str, Any] = {"delta": {}} if self.endpoint == "chat" else {"text": ""}
        return self.chunk([{"index": 0, **last, "finish_reason": finish_reason, "logprobs": None}])
