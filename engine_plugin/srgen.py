"""SRGen's per-token work inside vLLM: the entropy monitor and the reflection that makes a correction.

(Self-Reflective Generation at Test Time, arXiv 2510.02919.) Every decode step, per sequence:
- **Monitor**: the entropy of the next-token distribution at the request's temperature is compared with a
  dynamic threshold over the sequence's last `window` entropies:
  `tau = max(mean + k * max(std, min_std), min_threshold)` (a fixed `warmup_threshold` until `window`
  entropies exist), with the sample standard deviation as the official code takes it (torch.std, N-1).
  The current entropy joins the history after tau is computed.
- **Reflect** where `H > tau` (at most `max_corrections` times): one vector `delta` in hidden space, added to
  the final hidden state of every context position, is optimised for `steps` AdamW steps against
  `(1 - lam) * CE(whole context) + lam * entropy(current position)`; the current token is then drawn from
  `lm_head(h_current + delta)` and delta is dropped. The KV cache is untouched (delta lives after the last layer).

This runs from hidden states the engine already computed, for all triggered rows of a step at once: the
official code instead stops generation and re-prefills the whole context for every trigger.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from refine_server.contract.params import SRGenParams
from refine_server.kernels.srgen_loss import srgen_loss_and_grad

# ---- monitor ---------------------------------------------------------------------------------------------


@dataclass
class EntropyMonitor:
    """One sequence's entropy history and correction budget."""

    params: SRGenParams
    history: list[float] = field(default_factory=list)
    corrections: int = 0

    def threshold(self) -> float:
        p = self.params
        if len(self.history) < p.window:
            return p.warmup_threshold
        recent = self.history[-p.window :]
        return max(statistics.fmean(recent) + p.k * max(statistics.stdev(recent), p.min_std), p.min_threshold)

    def observe(self, entropy: float) -> tuple[bool, float]:
        """Whether this step triggers a correction, and the threshold it was compared with."""
        tau = self.threshold()
        trigger = entropy > tau and self.corrections < self.params.max_corrections and math.isfinite(entropy)
        self.history.append(entropy)
        if trigger:
            self.corrections += 1
        return trigger, tau

    def refund(self) -> None:
        """A trigger that was not acted on (the engine's per-step limit) does not spend the budget."""
        self.corrections -= 1


# ---- reflect ---------------------------------------------------------------------------------------------


@dataclass
class ReflectionInput:
    """One triggered row: its context's final hidden states and token ids, and how to optimise."""

    hidden: torch.Tensor  # [L, d]: positions 0..L-1 of the context, the last one is the current position
    token_ids: torch.Tensor  # [L]: the tokens at those positions (ids[j+1] is what h[j] must predict)
    temperature: float
    params: SRGenParams


def reflect(rows: list[ReflectionInput], weight: torch.Tensor) -> torch.Tensor:
    """Optimise one delta per row (all rows together) and return them, [rows, d] float32.

    The corrected logits of a row are lm_head(h_current + delta) = its logits + lm_head(delta).

    `weight` is lm_head's [V, d] matrix as the engine holds it (bf16 on a GPU): the kernels run the GEMMs in
    its dtype with float32 results, so no float32 copy of lm_head is ever made. Rows are independent: each
    delta sees only its own loss, so one AdamW over every delta is the same as optimising them one by one.
    """
    with torch.inference_mode(False):
        hidden = [r.hidden.detach() for r in rows]  # the engine dtype: the kernels upcast chunk by chunk
        targets = [r.token_ids[1:].detach().clone() for r in rows]
        deltas = [
            torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device, requires_grad=True) for _ in rows
        ]
        # AdamW as in the official code: weight_decay=1e-8, eps=1e-5, per-request learning rate.
        optimizer = torch.optim.AdamW(
            [{"params": [d], "lr": r.params.lr} for d, r in zip(deltas, rows)], weight_decay=1e-8, eps=1e-5
        )
        for step in range(max(r.params.steps for r in rows)):
            for row, h, y, delta in zip(rows, hidden, targets, deltas):
                if step < row.params.steps:
                    _, grad = srgen_loss_and_grad(h, delta.detach(), weight, y, row.temperature, row.params.lam)
                    delta.grad = grad
                else:
                    delta.grad = None  # this row has finished its own number of steps
            optimizer.step()
        return torch.stack([d.detach() for d in deltas])
