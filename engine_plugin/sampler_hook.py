"""The tokens the sampler drew, in the same step: what the token-statistics sensor needs after `apply`.

A logits processor runs before sampling and vLLM gives it no callback afterwards; the drawn token reaches it
only at the request's next step (V1: the live output-token list; V2: the next step's input ids). The last token
of a sequence has no next step, and an idle engine takes none, so the sensor would lose it. So the processor
of each runner wraps its runner's sampler class once (V1: `Sampler.forward`, V2: `Sampler.__call__`, which
`GPUWatermarkSampler` inherits): after the sampler returns, the listener gets its `sampled_token_ids`
([rows, 1] on the device, one row per logits row, in the order `apply` saw them). The wrapper costs one
attribute read per step when no request asked for statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_WRAPPED = "_refine_sampled_tokens"


class SampledTokens:
    """The one process-wide listener: vLLM builds the sampler and the processors separately and gives neither
    a handle on the other, so this is where they meet (as the hidden-state tap is for the model)."""

    def __init__(self) -> None:
        self.listener: Callable[[torch.Tensor], None] | None = None

    def deliver(self, output: Any) -> None:
        listener = self.listener
        if listener is None:
            return
        try:
            listener(output.sampled_token_ids)
        except Exception:  # statistics must never take the sampler down
            log.exception("refine: token statistics failed for a step")


SAMPLED_TOKENS = SampledTokens()


def wrap_sampler(sampler_cls: type, method: str) -> None:
    """Make `sampler_cls.method` hand its output to SAMPLED_TOKENS. Idempotent."""
    original = getattr(sampler_cls, method)
    if getattr(original, _WRAPPED, False):
        return

    def sample_and_report(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        SAMPLED_TOKENS.deliver(output)
        return output

    setattr(sample_and_report, _WRAPPED, True)
    sample_and_report.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(sampler_cls, method, sample_and_report)
