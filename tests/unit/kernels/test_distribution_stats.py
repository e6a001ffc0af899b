"""kernels.token_stats: the PyTorch fallback (what the public function runs on CPU tensors) against a float64
reference written from the definitions. tests/unit/kernels/test_triton.py checks the Triton kernel."""

from __future__ import annotations

import torch

from refine_server.kernels.distribution_stats import token_stats
from tests.unit.kernels.references import ATOL, RTOL, reference_token_stats

VOCAB_SIZE = 49152  # the default model's vocabulary


def assert_token_stats_match(logits: torch.Tensor, temperature: torch.Tensor | float) -> None:
    temps = torch.as_tensor(temperature, dtype=torch.float32).broadcast_to(logits.shape[:1])
    got = token_stats(logits, temperature)
    for name, value, expected in zip(("entropy", "varentropy", "margin"), got, reference_token_stats(logits, temps)):
        assert value.dtype == torch.float32 and value.shape == logits.shape[:1], name
        torch.testing.assert_close(
            value, expected.float(), rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_token_stats_per_row_temperatures_masked_and_tied_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1000, generator=gen) * 3
    logits[1, torch.randperm(1000, generator=gen)[:600]] = float("-inf")  # masked tokens
    logits[2, :999] = float("-inf")  # only one token allowed: H = 0, margin = 1
    logits[3, [5, 17]] = 20.0  # tie at the top: margin 0
    temps = torch.tensor([0.3, 0.6, 1.0, 1.0, 1.5, 2.0, 0.9, 1.0])
    assert_token_stats_match(logits, temps)


def test_token_stats_one_row_of_the_real_vocabulary() -> None:
    logits = torch.randn(1, VOCAB_SIZE, generator=torch.Generator().manual_seed(1)) * 4
    assert_token_stats_match(logits, 0.7)
    assert_token_stats_match(logits, 1.0)


def test_token_stats_reads_bfloat16_logits() -> None:
    logits = (torch.randn(4, 3000, generator=torch.Generator().manual_seed(2)) * 2).bfloat16()
    assert_token_stats_match(logits, torch.tensor([0.5, 1.0, 1.0, 1.7]))


def test_token_stats_writes_the_log_normaliser_on_request() -> None:
    """With it, a token drawn later has probability exp(logit / T - lse): what the engine's sensor reports."""
    logits = torch.randn(3, 2000, generator=torch.Generator().manual_seed(3)) * 3
    logits[1, :1500] = float("-inf")
    temps = torch.tensor([0.5, 1.0, 1.8])
    lse = torch.full((3,), float("nan"))
    token_stats(logits, temps, lse_out=lse)
    p = torch.softmax(logits.double() / temps.double()[:, None], dim=-1)
    tokens = torch.tensor([7, 1999, 0])
    expected = p[torch.arange(3), tokens]
    got = torch.exp(logits[torch.arange(3), tokens] / temps - lse)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
