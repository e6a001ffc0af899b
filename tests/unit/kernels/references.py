"""Float64 references written from the kernels' definitions, and how close float32 results must come to them."""

from __future__ import annotations

import torch

RTOL, ATOL = 1e-5, 1e-6  # float32 results against float64 references


def reference_token_stats(logits: torch.Tensor, temps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Entropy, varentropy and top-2 margin straight from their definitions, in float64."""
    p = torch.softmax(logits.double() / temps.double()[:, None], dim=-1)
    entropy = -torch.xlogy(p, p).sum(dim=-1)  # xlogy: 0 log 0 = 0 for masked tokens
    surprisal_dev = torch.where(p > 0, torch.log(p) + entropy[:, None], 0.0)
    varentropy = (p * surprisal_dev**2).sum(dim=-1)
    top2 = p.topk(2, dim=-1).values
    return entropy, varentropy, top2[:, 0] - top2[:, 1]


def reference_srgen(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SRGen loss on all [L, V] logits at once, in float64, with the gradient from autograd."""
    delta = delta.double().clone().requires_grad_()
    logits = (hidden.double() + delta) @ weight.double().T
    ce = torch.nn.functional.cross_entropy(logits[:-1], targets) if len(hidden) > 1 else logits.new_zeros(())
    log_p = torch.log_softmax(logits[-1] / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum()
    loss = (1 - lam) * ce + lam * entropy
    loss.backward()
    return loss.detach(), delta.grad
