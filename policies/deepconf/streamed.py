"""DeepConf's stop without refine's plugin: the proxy measures each token's confidence from the stream's
`top_logprobs` as it arrives and aborts the stream once the window mean falls below the threshold.

NVIDIA's TensorRT-LLM DeepConf controller stops traces from outside the engine the same way. What differs from
the in-engine stop: the confidence is over the k alternatives the API shows (k <= 20), which is exactly the
paper's definition (the engine's is the same, measured on the device); and the engine may have drawn a few
tokens more before it sees the connection close (they are in the usage, not in the trace).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from refine_server.policies.confidence import token_confidence_from_logprobs


class WindowStop:
    """The in-engine stop's rule, kept in the proxy: after each token, whether the trace must end now (at
    least `first_check` tokens exist and the mean confidence of the last `window` is below `threshold`).
    NaN confidences (a token without alternatives) are skipped, as `confidence.group_confidences` skips them."""

    def __init__(self, threshold: float, window: int, first_check: int):
        self.threshold, self.window, self.first_check = threshold, window, first_check
        self._last: deque[float] = deque(maxlen=window)
        self.tokens = 0

    def push(self, confidence: float) -> bool:
        self.tokens += 1
        self._last.append(confidence)
        if self.tokens < self.first_check:
            return False
        known = [c for c in self._last if not math.isnan(c)]
        return bool(known) and sum(known) / len(known) < self.threshold


@dataclass
class StreamedTrace:
    """What one streamed trace wrote, its token confidences, and where the proxy stopped it (None: not)."""

    text: str = ""
    finish_reason: str | None = None
    confidences: list[float] = field(default_factory=list)
    stopped_at: int | None = None


async def read_trace(chunks: AsyncGenerator[dict[str, Any], None], k: int, stop: WindowStop | None) -> StreamedTrace:
    """Read a chat stream (one choice, `logprobs` with `top_logprobs` = k) until it ends or `stop` says so;
    leaving the stream closes the connection and vLLM aborts the generation. A stopped trace finishes as the
    engine's stop makes it finish: `stop`, at the token after the one that fell below."""
    trace = StreamedTrace()
    async with aclosing(chunks) as stream:
        async for chunk in stream:
            for choice in chunk.get("choices") or ():
                trace.text += (choice.get("delta") or {}).get("content") or ""
                trace.finish_reason = choice.get("finish_reason") or trace.finish_reason
                for item in (choice.get("logprobs") or {}).get("content") or ():
                    top = [alt["logprob"] for alt in item.get("top_logprobs") or ()]
                    confidence = token_confidence_from_logprobs(top, k)
                    trace.confidences.append(confidence)
                    if stop is not None and stop.push(confidence):
                        trace.stopped_at = len(trace.confidences)
                        trace.finish_reason = "stop"
                        return trace
    return trace
