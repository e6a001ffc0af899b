"""DeepConf's token confidence (arXiv 2508.15260) of each row of next-token logits, on the rows' device.

    C = -(1/k) * sum of the k largest log p,   p = softmax(logits) at T = 1 over the whole vocabulary

High where the distribution is peaked. The authors read it from the API's `top_logprobs` (k = 20); inside the
engine the same numbers come from the logits the sampler sees. k is per row (each request asks its own), the
top-k is taken once at the largest k any request may ask, so the shapes never depend on the batch's values and
nothing waits for the device. A row with fewer than k allowed tokens (-inf logits: `allowed_token_ids`, a
grammar) averages over the ones it has: -inf would make the confidence infinite and say nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_confidence"]


def token_confidence(logits: Tensor, k: Tensor, max_k: int, *, lse: Tensor | None = None) -> Tensor:
    """C per row, float32 [R]. logits: [R, V] float32, each row with a finite entry; k: [R] integers in
    1..max_k on the same device. lse: the rows' log sum exp at T = 1 where the caller has it already (the
    sensor's token_stats computes it for rows sampled at T = 1): one pass over [R, V] fewer."""
    top = logits.topk(min(max_k, logits.shape[-1]), dim=-1).values
    log_p = top - (lse[:, None] if lse is not None else torch.logsumexp(logits, dim=-1, keepdim=True))
    ranks = torch.arange(top.shape[-1], device=logits.device)
    counted = (ranks[None, :] < k[:, None]) & torch.isfinite(log_p)
    total = torch.where(counted, log_p, 0.0).sum(dim=-1)
    return -total / counted.sum(dim=-1).clamp(min=1)
