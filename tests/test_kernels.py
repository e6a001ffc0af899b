"""The kernels in refine_server.kernels.

The PyTorch fallbacks (what the public functions run on CPU tensors) are checked against float64 references
written from the definitions; the Triton kernels are checked against the fallbacks in Triton's interpreter, and
compiled for a Hopper GPU so that errors the interpreter does not see (types, loop-carried values) show up
without one. Neither needs a GPU, so both fail rather than skip when triton is missing (it comes with vLLM);
only the tests that need a CUDA device skip without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refine_server.kernels.srgen_loss import (
    srgen_logits_row,
    srgen_loss_and_grad,
    srgen_loss_and_grad_torch,
    srgen_loss_and_grad_triton,
)
from refine_server.kernels.token_stats import token_stats

VOCAB_SIZE = 49152  # the default model's vocabulary
RTOL, ATOL = 1e-5, 1e-6  # float32 results against float64 references


def reference_token_stats(logits: torch.Tensor, temps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Entropy, varentropy and top-2 margin straight from their definitions, in float64."""
    p = torch.softmax(logits.double() / temps.double()[:, None], dim=-1)
    entropy = -torch.xlogy(p, p).sum(dim=-1)  # xlogy: 0 log 0 = 0 for masked tokens
    surprisal_dev = torch.where(p > 0, torch.log(p) + entropy[:, None], 0.0)
    varentropy = (p * surprisal_dev**2).sum(dim=-1)
    top2 = p.topk(2, dim=-1).values
    return entropy, varentropy, top2[:, 0] - top2[:, 1]


def assert_token_stats_match(logits: torch.Tensor, temperature: torch.Tensor | float) -> None:
    temps = torch.as_tensor(temperature, dtype=torch.float32).broadcast_to(logits.shape[:1])
    got = token_stats(logits, temperature)
    for name, value, expected in zip(("entropy", "varentropy", "margin"), got, reference_token_stats(logits, temps)):
        assert value.dtype == torch.float32 and value.shape == logits.shape[:1], name
        torch.testing.assert_close(value, expected.float(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


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


def reference_srgen(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    temperature: float, lam: float,
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


# Runs in a subprocess: TRITON_INTERPRET is read when @triton.jit decorates a kernel, that is when the kernel
# modules are first imported.
INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch

    from refine_server.kernels.srgen_loss import _ce_chunk_triton, srgen_loss_and_grad_torch, srgen_loss_and_grad_triton
    from refine_server.kernels.token_stats import token_stats_torch, token_stats_triton


    def check_token_stats(logits, temperature):
        for got, expected in zip(token_stats_triton(logits, temperature), token_stats_torch(logits, temperature)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


    gen = torch.Generator().manual_seed(0)
    # 5000 tokens: one full 4096-wide block and one partial block per row
    logits = torch.randn(6, 5000, generator=gen) * 3
    logits[1, :4500] = float("-inf")  # a whole block of masked tokens before the first finite one
    logits[2, ::3] = float("-inf")
    logits[3, [10, 4200]] = 40.0  # tie at the top, in different blocks
    check_token_stats(logits, torch.tensor([0.5, 1.0, 2.0, 1.0, 0.7, 1.3]))
    check_token_stats(logits[:, 7:4907], 0.8)  # a view: row stride 5000, not the row length
    check_token_stats(logits.bfloat16(), 1.0)
    check_token_stats(logits[:, -1:], 1.0)  # one-token vocabulary: margin 1

    dim, vocab = 16, 5000
    for positions, lam, temperature in [(1, 0.05, 0.6), (2, 0.0, 1.0), (37, 0.05, 0.6), (37, 1.0, 1.0)]:
        hidden = torch.randn(positions, dim, generator=gen)
        delta = torch.randn(dim, generator=gen) * 0.1
        weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
        targets = torch.randint(0, vocab, (positions - 1,), generator=gen)
        for w in (weight, weight.bfloat16()):  # both run the same bfloat16 GEMMs, so they agree as tightly
            args = (hidden, delta, w, targets, temperature, lam, 8)  # chunk_size 8: 36 positions in 5 chunks
            for got, expected in zip(srgen_loss_and_grad_triton(*args), srgen_loss_and_grad_torch(*args)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    # Out-of-vocabulary targets never reach the kernel, but if one did, it reads nothing outside its row:
    # its CE is NaN and the row becomes plain softmax, with no one-hot subtracted.
    logits = torch.randn(2, vocab, generator=gen)
    expected = torch.softmax(logits, dim=-1)
    ce_sum = _ce_chunk_triton(logits, torch.tensor([-1, vocab]))
    assert ce_sum.isnan(), ce_sum
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    print("ok")
''')


def test_triton_kernels_match_fallbacks_in_interpreter(tmp_path: Path) -> None:
    import triton  # noqa: F401  (no skip: the interpreter runs on any CPU, so a missing triton is a failure)

    script = tmp_path / "interpret_kernels.py"  # a file, not -c: @triton.jit reads the kernel's source
    script.write_text(INTERPRETER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_triton_kernels_compile_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiles (no GPU needed) each kernel down to a cubin for sm_90, the H100, as a CUDA launch would."""
    import triton  # no skip, as above
    from triton.backends.compiler import GPUTarget

    from refine_server.kernels.srgen_loss import _ce_residual_kernel
    from refine_server.kernels.token_stats import _token_stats_kernel

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    signatures = {
        _token_stats_kernel: {
            "logits_ptr": "*bf16", "row_stride": "i32", "temperature_ptr": "*fp32", "vocab": "i32",
            "entropy_ptr": "*fp32", "varentropy_ptr": "*fp32", "margin_ptr": "*fp32", "BLOCK": "constexpr",
        },
        _ce_residual_kernel: {
            "logits_ptr": "*fp32", "row_stride": "i32", "targets_ptr": "*i64", "vocab": "i32", "ce_ptr": "*fp32",
            "BLOCK": "constexpr",
        },
    }
    for kernel, signature in signatures.items():
        if not isinstance(kernel, triton.runtime.JITFunction):  # TRITON_INTERPRET was set when it was decorated
            kernel = triton.runtime.JITFunction(kernel.fn)
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": 4096})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.__name__
