"""The Triton kernels of refine_server.kernels without a GPU.

They are checked against the PyTorch fallbacks in Triton's interpreter, and compiled for a Hopper GPU so that errors
the interpreter does not see (types, loop-carried values) show up without one. Neither needs a GPU, so both fail
rather than skip when triton is missing (it comes with vLLM).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in a subprocess: TRITON_INTERPRET is read when @triton.jit decorates a kernel, that is when the kernel
# modules are first imported.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch

    from refine_server.kernels.srgen_loss import _ce_chunk_triton, srgen_loss_and_grad_torch, srgen_loss_and_grad_triton
    from refine_server.kernels.distribution_stats import token_stats_torch, token_stats_triton


    def check_token_stats(logits, temperature):
        lse_got, lse_expected = (torch.empty(logits.shape[0]) for _ in range(2))
        got = token_stats_triton(logits, temperature, lse_out=lse_got)
        expected = token_stats_torch(logits, temperature, lse_out=lse_expected)
        for g, e in zip((*got, lse_got), (*expected, lse_expected)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


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
""")


def test_triton_kernels_match_fallbacks_in_interpreter(tmp_path: Path) -> None:
    import triton  # noqa: F401  (no skip: the interpreter runs on any CPU, so a missing triton is a failure)

    script = tmp_path / "interpret_kernels.py"  # a file, not -c: @triton.jit reads the kernel's source
    script.write_text(INTERPRETER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_triton_kernels_compile_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiles (no GPU needed) each kernel down to a cubin for sm_90, the H100, as a CUDA launch would."""
    import triton  # no skip, as above
    from triton.backends.compiler import GPUTarget

    from refine_server.kernels.distribution_stats import _token_stats_kernel
    from refine_server.kernels.srgen_loss import _ce_residual_kernel

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    signatures = {
        _token_stats_kernel: {
            "logits_ptr": "*bf16",
            "row_stride": "i32",
            "temperature_ptr": "*fp32",
            "vocab": "i32",
            "entropy_ptr": "*fp32",
            "varentropy_ptr": "*fp32",
            "margin_ptr": "*fp32",
            "lse_ptr": "*fp32",
            "BLOCK": "constexpr",
            "WRITE_LSE": "constexpr",
        },
        _ce_residual_kernel: {
            "logits_ptr": "*fp32",
            "row_stride": "i32",
            "targets_ptr": "*i64",
            "vocab": "i32",
            "ce_ptr": "*fp32",
            "BLOCK": "constexpr",
        },
    }
    for kernel, signature in signatures.items():
        if not isinstance(kernel, triton.runtime.JITFunction):  # TRITON_INTERPRET was set when it was decorated
            kernel = triton.runtime.JITFunction(kernel.fn)
        constexprs = {
            name: 4096 if name == "BLOCK" else True  # WRITE_LSE on: the kernel's every store
            for name, kind in signature.items()
            if kind == "constexpr"
        }
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.__name__
