"""kernels.srgen_loss: the PyTorch fallback (what the public functions run on CPU tensors) against a float64
reference with autograd's gradient, 16-bit inputs, bad targets, and the Triton kernel on a CUDA device (the only
test that skips without one). tests/unit/kernels/test_triton.py checks the Triton kernel without a GPU."""

from __future__ import annotations

import pytest
import torch

from refine_server.kernels.srgen_loss import (
    srgen_logits_row,
    srgen_loss_and_grad,
    srgen_loss_and_grad_torch,
    srgen_loss_and_grad_triton,
)
from tests.unit.kernels.references import ATOL, RTOL, reference_srgen


def srgen_inputs(positions: int, dim: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """hidden, delta, weight, targets with logits of order 1, as a real LM head gives."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, dim, generator=gen)
    delta = torch.randn(dim, generator=gen) * 0.1
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
    targets = torch.randint(0, vocab, (positions - 1,), generator=gen)
    return hidden, delta, weight, targets


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("positions", [1, 2, 37, 300])
def test_srgen_loss_and_grad_matches_autograd(positions: int, lam: float, temperature: float) -> None:
    hidden, delta, weight, targets = srgen_inputs(positions, dim=64, vocab=1000, seed=positions)
    # chunk_size 64: 299 target positions take five chunks, the last one partial
    loss, grad = srgen_loss_and_grad(hidden, delta, weight, targets, temperature, lam, chunk_size=64)
    expected_loss, expected_grad = reference_srgen(hidden, delta, weight, targets, temperature, lam)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.shape == delta.shape and grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss.float(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=RTOL, atol=ATOL)


# A 16-bit LM head rounds the GEMM inputs and outputs (bfloat16 keeps 8 significant bits, float16 11). Against the
# float32 path, bfloat16 moves the loss by at most 1.1e-4 relative and the gradient by at most 9.7e-3 in norm
# (relative) in the cases below, float16 by about 10x less: the bounds leave 2x margin on the gradient.
LOW_PRECISION_LOSS_RTOL, LOW_PRECISION_GRAD_RTOL = 2e-3, 2e-2


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lam", "temperature"), [(0.0, 1.0), (0.05, 0.6), (1.0, 0.6)])
def test_srgen_16_bit_weight_agrees_with_float32(weight_dtype: torch.dtype, lam: float, temperature: float) -> None:
    hidden, delta, weight, targets = srgen_inputs(300, dim=64, vocab=1000, seed=3)
    expected_loss, expected_grad = srgen_loss_and_grad(hidden, delta, weight, targets, temperature, lam, chunk_size=64)
    loss, grad = srgen_loss_and_grad(hidden, delta, weight.to(weight_dtype), targets, temperature, lam, chunk_size=64)
    assert loss.dtype == grad.dtype == torch.float32 and grad.shape == delta.shape
    assert abs(loss - expected_loss) <= LOW_PRECISION_LOSS_RTOL * expected_loss
    assert (grad - expected_grad).norm() <= LOW_PRECISION_GRAD_RTOL * expected_grad.norm()
    row = srgen_logits_row(hidden[-1], delta, weight.to(weight_dtype))
    assert row.dtype == torch.float32
    torch.testing.assert_close(row, srgen_logits_row(hidden[-1], delta, weight), rtol=0, atol=0.05)  # seen: 0.012


def test_srgen_takes_16_bit_hidden_states() -> None:
    hidden, delta, weight, targets = srgen_inputs(40, dim=64, vocab=1000, seed=4)
    hidden = hidden.bfloat16()  # the engine's own hidden states; delta stays float32
    loss, grad = srgen_loss_and_grad(hidden, delta, weight.bfloat16(), targets, 0.6, 0.05, chunk_size=16)
    expected_loss, expected_grad = reference_srgen(hidden.float(), delta, weight.bfloat16().float(), targets, 0.6, 0.05)
    assert abs(loss - expected_loss) <= LOW_PRECISION_LOSS_RTOL * expected_loss
    assert (grad - expected_grad).norm() <= LOW_PRECISION_GRAD_RTOL * expected_grad.norm()


def test_srgen_rejects_targets_of_the_wrong_length() -> None:
    hidden, delta, weight, targets = srgen_inputs(5, dim=8, vocab=50, seed=0)
    with pytest.raises(ValueError, match="targets"):
        srgen_loss_and_grad(hidden, delta, weight, targets[:-1], 1.0, 0.05)


# The Triton version is called on CPU tensors: the check comes before any kernel launch, so none is attempted.
@pytest.mark.parametrize("loss_and_grad", [srgen_loss_and_grad_torch, srgen_loss_and_grad_triton])
@pytest.mark.parametrize("bad_target", [-1, 50])  # -1: vLLM's placeholder for a token not sampled yet; 50 = V
def test_srgen_rejects_targets_outside_the_vocabulary(loss_and_grad, bad_target: int) -> None:
    hidden, delta, weight, targets = srgen_inputs(5, dim=8, vocab=50, seed=0)
    targets[2] = bad_target
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 50\)"):
        loss_and_grad(hidden, delta, weight, targets, 1.0, 0.05)


def test_srgen_logits_row() -> None:
    hidden, delta, weight, _ = srgen_inputs(3, dim=8, vocab=50, seed=0)
    torch.testing.assert_close(srgen_logits_row(hidden[-1], delta, weight), (hidden[-1] + delta) @ weight.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_srgen_on_cuda(weight_dtype: torch.dtype) -> None:
    """The public function on CUDA tensors (the Triton kernel) against the float64 reference of the same weight."""
    hidden, delta, weight, targets = srgen_inputs(300, dim=64, vocab=5000, seed=5)
    weight = weight.to(weight_dtype)
    loss, grad = srgen_loss_and_grad(hidden.cuda(), delta.cuda(), weight.cuda(), targets.cuda(), 0.6, 0.05, 64)
    expected_loss, expected_grad = reference_srgen(hidden, delta, weight.float(), targets, 0.6, 0.05)
    # one bound for both dtypes, the bfloat16 one (float32 GEMMs may also run in TF32, depending on torch's settings)
    assert abs(loss.cpu() - expected_loss) <= LOW_PRECISION_LOSS_RTOL * expected_loss
    assert (grad.cpu() - expected_grad).norm() <= LOW_PRECISION_GRAD_RTOL * expected_grad.norm()
