"""The kernels in refine_server.kernels.

The PyTorch fallbacks (what the public functions run on CPU tensors) are checked against float64 references
written from the definitions; the Triton kernels are checked against the fallbacks in Triton's interpreter, and
compiled for a Hopper GPU so that errors the interpreter does not see (types, loop-carried values) show up
without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refine_server.kernels.srgen_loss import srgen_logits_row, srgen_loss_and_grad
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


def test_srgen_rejects_targets_of_the_wrong_length() -> None:
    hidden, delta, weight, targets = srgen_inputs(5, dim=8, vocab=50, seed=0)
    with pytest.raises(ValueError, match="targets"):
        srgen_loss_and_grad(hidden, delta, weight, targets[:-1], 1.0, 0.05)


def test_srgen_logits_row() -> None:
    hidden, delta, weight, _ = srgen_inputs(3, dim=8, vocab=50, seed=0)
    torch.testing.assert_close(srgen_logits_row(hidden[-1], delta, weight), (hidden[-1] + delta) @ weight.T)


# Runs in a subprocess: TRITON_INTERPRET is read when @triton.jit decorates a kernel, that is when the kernel
# modules are first imported. Exit code 77 means the interpreter itself cannot run here (a trivial kernel failed).
INTERPRETER_SCRIPT = textwrap.dedent('''
    import sys

    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


    try:
        src, dst = torch.arange(5.0), torch.zeros(5)
        _copy[(1,)](src, dst, 5, BLOCK=8)
        assert torch.equal(src, dst), "a copy kernel did not copy"
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(77)

    from refine_server.kernels.srgen_loss import srgen_loss_and_grad_torch, srgen_loss_and_grad_triton
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
        args = (hidden, delta, weight, targets, temperature, lam, 8)  # chunk_size 8: 36 positions in 5 chunks
        for got, expected in zip(srgen_loss_and_grad_triton(*args), srgen_loss_and_grad_torch(*args)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    print("ok")
''')


def test_triton_kernels_match_fallbacks_in_interpreter(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="triton is not installed: only the PyTorch fallbacks can run")
    script = tmp_path / "interpret_kernels.py"  # a file, not -c: @triton.jit reads the kernel's source
    script.write_text(INTERPRETER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode == 77:
        pytest.skip(f"Triton's interpreter cannot run on this machine: {result.stderr.strip()}")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_triton_kernels_compile_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiles (no GPU needed) each kernel down to a cubin for sm_90, the H100, as a CUDA launch would."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.backends.compiler import GPUTarget

    from refine_server.kernels.srgen_loss import _ce_residual_kernel
    from refine_server.kernels.token_stats import _token_stats_kernel

    if not isinstance(_token_stats_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET is set: the kernels were decorated for the interpreter, not compiled")
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
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": 4096})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.__name__
