"""vLLM-shaped chat responses for cyberv's unit tests: the sensor's hand-made candidates and the scripted backend
(a token per word; tokens containing SPIKE_WORD are written with low confidence)."""

from __future__ import annotations

import math
import re
from typing import Any

from refine_server.policies.cyberv.sensor import Generation
from tests.conftest import MODEL

SPIKE_WORD = "maybe"  # tokens containing it are written with low confidence: the uncertainty spike


def _split_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


def _token(tok: str, prob: float) -> dict[str, Any]:
    alternative = math.log(max((1 - prob) * 0.8, 1e-9))
    return {
        "token": tok,
        "logprob": math.log(prob),
        "bytes": list(tok.encode()),
        "top_logprobs": [
            {"token": tok, "logprob": math.log(prob), "bytes": None},
            {"token": "<alt>", "logprob": alternative, "bytes": None},
        ],
    }


def _choice(text: str, index: int = 0, first_prob: float = 0.9) -> dict[str, Any]:
    content = []
    for i, tok in enumerate(_split_tokens(text)):
        prob = first_prob if i == 0 else 0.3 if SPIKE_WORD in tok else 0.9
        content.append(_token(tok, prob))
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "logprobs": {"content": content},
    }


def _response(choices: list[dict[str, Any]]) -> dict[str, Any]:
    completion = sum(len(c["logprobs"]["content"]) for c in choices)
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": choices,
        "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion},
    }


def _gen(text: str, first_prob: float = 0.9) -> Generation:
    return Generation.from_choice(_choice(text, first_prob=first_prob))


DIRECT = "The answer is 4."
