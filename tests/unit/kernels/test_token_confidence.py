"""token_confidence against its definition in float64: per-row k, and rows with fewer allowed tokens than k."""

from __future__ import annotations

import torch

from refine_server.kernels.token_confidence import token_confidence
from tests.unit.kernels.references import ATOL, RTOL


def _reference(row: torch.Tensor, k: int) -> float:
    log_p = torch.log_softmax(row.double(), dim=-1)
    top = log_p[torch.isfinite(log_p)].topk(min(k, int(torch.isfinite(log_p).sum()))).values
    return float(-top.mean())


def test_each_row_is_minus_the_mean_of_its_k_largest_log_probabilities() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 4
    k = torch.tensor([1, 5, 20, 20])
    got = token_confidence(logits, k, max_k=20)
    expected = torch.tensor([_reference(logits[i], int(k[i])) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=ATOL)
    assert got[0] < got[1] < got[2]  # more alternatives, lower log p, higher mean surprisal


def test_a_row_with_fewer_allowed_tokens_than_k_averages_over_the_ones_it_has() -> None:
    logits = torch.full((2, 50), float("-inf"))
    logits[0, [3, 7, 9]] = torch.tensor([2.0, 1.0, 0.5])
    logits[1, 4] = 0.0  # one allowed token: p = 1, C = 0
    got = token_confidence(logits, torch.tensor([20, 20]), max_k=20)
    assert torch.isfinite(got).all() and got[1] == 0
    torch.testing.assert_close(got[0].double(), torch.tensor(_reference(logits[0], 20), dtype=torch.float64))


def test_a_given_normaliser_at_t1_gives_the_same_confidences() -> None:
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(1)) * 3
    logits[2, 100:] = float("-inf")
    k = torch.tensor([3, 20, 20])
    given = token_confidence(logits, k, max_k=20, lse=torch.logsumexp(logits, dim=-1))
    torch.testing.assert_close(given, token_confidence(logits, k, max_k=20))
