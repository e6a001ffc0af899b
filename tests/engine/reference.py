"""Independent recomputations of what the engine plugin reports, with transformers in float32 from the token ids
the engine returned: SRGen's correction and the token-statistics sensor. Shared by every model's engine tests
(test_srgen.py and test_sensor.py for the default model, test_second_model.py for the second)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from openai import OpenAI

from refine_server.contract.params import SRGenParams
from refine_server.policies.token_stats import ChoiceTokenStats


def model_dir(client: OpenAI, model: str) -> str:
    """The embedded engine's model folder, as vLLM reports it in /v1/models."""
    return next(m for m in client.models.list() if m.id == model).model_extra["root"]


def load_float32(folder: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def srgen_distributions(model: Any, context_ids: list[int], params: SRGenParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token distribution after `context_ids` before and after SRGen's correction: one delta on the final
    hidden state of every context position, `params.steps` AdamW steps on (1 - lam) * CE(context) + lam *
    entropy(last position), at T = 1 (a greedy request's)."""
    ids = torch.tensor([context_ids])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0].float()  # after the final norm
    weight = model.lm_head.weight.detach().float()
    delta = torch.zeros(hidden.shape[1], requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=params.lr, weight_decay=1e-8, eps=1e-5)
    for _ in range(params.steps):
        logits = (hidden + delta) @ weight.T
        ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        p_last = torch.softmax(logits[-1], dim=-1)
        loss = (1 - params.lam) * ce + params.lam * -(p_last * torch.log(p_last)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = torch.softmax(hidden[-1] @ weight.T, dim=-1)
        after = torch.softmax((hidden[-1] + delta) @ weight.T, dim=-1)
    return before, after


def assert_correction_matches(correction: dict, before: torch.Tensor, after: torch.Tensor, tol: float) -> None:
    """The trace's most likely tokens before and after the correction are the recomputation's, their
    probabilities within `tol`; and the correction moved the distribution by more than the tolerance, without
    which the comparison would say nothing."""
    assert correction["token_before"]["id"] == int(before.argmax())
    assert correction["token_before"]["prob"] == pytest.approx(float(before.max()), abs=tol)
    assert correction["token_after"]["id"] == int(after.argmax())
    assert correction["token_after"]["prob"] == pytest.approx(float(after.max()), abs=tol)
    assert abs(float(after.max()) - float(before.max())) > 2 * tol


def assert_token_stats_match(model: Any, choice: dict, got: ChoiceTokenStats) -> None:
    """A greedy choice's per-token statistics against a recomputation over the whole vocabulary at T = 1."""
    ids = torch.tensor([choice["prompt_token_ids"] + choice["token_ids"]])
    prompt_len = len(choice["prompt_token_ids"])
    with torch.no_grad():
        logits = model(ids).logits[0, prompt_len - 1 : -1]  # row j: the distribution token j was drawn from
    log_p = torch.log_softmax(logits.double(), dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    varentropy = (p * (log_p + entropy[:, None]) ** 2).sum(dim=-1)
    top2 = p.topk(2, dim=-1).values
    drawn = p[torch.arange(len(got.token_ids)), torch.tensor(got.token_ids)]

    def close(values: list[float], expected: torch.Tensor, atol: float) -> None:
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected, rtol=0, atol=atol)

    close(got.entropy, entropy, 1e-3)
    close(got.varentropy, varentropy, 1e-2)
    close(got.margin, top2[:, 0] - top2[:, 1], 1e-3)
    close(got.prob, drawn, 1e-3)
    # Greedy decoding draws the most likely token: its probability is the top one.
    close(got.prob, top2[:, 0], 1e-3)
    # The comparison means something only if the distributions differ from token to token.
    assert float(entropy.max() - entropy.min()) > 0.5
