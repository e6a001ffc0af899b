"""SRGen's reflection loss and its gradient with respect to the corrective vector delta.

SRGen nudges the last hidden state by a vector delta, fitted by a few gradient steps on
    loss(delta) = (1 - lam) * mean_{j < L-1} CE(z_j, targets_j) + lam * H(softmax(z_{L-1} / T)),
    z_j = (hidden_j + delta) @ weight.T            (the LM head's logits at position j).
The first term keeps the already generated tokens likely; the second makes the next token more certain.

Because delta is added at every position, the gradient is a single product with the LM head:
    dloss/ddelta = (sum_j dloss/dz_j) @ weight,
so this module only ever holds a [V] running sum plus one chunk of positions' logits ([chunk_size, V])
rather than all [L, V] logits, and needs no autograd. On CUDA (with triton installed) each chunk's
softmax / cross-entropy pass is a Triton kernel that overwrites the chunk in place; elsewhere it is PyTorch.

Precision: weight may be float32 or the engine's own bfloat16 / float16 LM head, used as is. Each matmul runs
in weight.dtype (its other operand cast to it) and its result is upcast to float32 before any softmax, CE or
entropy. A 16-bit GEMM runs on tensor cores; a float32 copy of the head would not only cost V * d * 4 bytes
(2.2 GB for a 7B model) but also run on plain FP32 units, since vLLM sets the float32 matmul precision to
"highest" (no TF32). Rounding the GEMM inputs and outputs to 16 bits is the precision the engine's own
logits have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: srgen_loss_and_grad() falls back to PyTorch
    triton = None

__all__ = ["srgen_logits_row", "srgen_loss_and_grad", "srgen_loss_and_grad_torch", "srgen_loss_and_grad_triton"]

# Widest slice of the vocabulary one program holds in registers at a time.
_MAX_BLOCK = 4096

CeChunk = Callable[[Tensor, Tensor], Tensor]
"""(logits [n, V], targets [n]) -> summed CE; overwrites logits in place with softmax(logits) - onehot(targets)."""


def srgen_logits_row(h_last: Tensor, delta: Tensor, weight: Tensor) -> Tensor:
    """The float32 logits [V] that the shifted hidden state h_last + delta gives: (h_last + delta) @ weight.T."""
    return _logits(h_last, delta, weight)


def srgen_loss_and_grad(
    hidden: Tensor,
    delta: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    lam: float,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """SRGen's loss (0-dim) and its gradient with respect to delta ([d]), both float32.

    hidden: [L, d] hidden states of the positions so far (the last one predicts the next token); any float dtype.
    delta: [d] corrective vector added to every position; any float dtype (hidden + delta is taken in float32).
    weight: [V, d] LM head, float32 or bfloat16 / float16: the matmuls run in its dtype (see the module docstring).
    targets: [L-1] int64, targets[j] is the token that followed position j; each in [0, V), else ValueError.
    temperature: > 0, used by the entropy term only.  lam: weight of the entropy term, in [0, 1].
    chunk_size: positions whose logits are held at once; memory is chunk_size * V floats.
    With L == 1 there is nothing to reconstruct and the loss is lam * entropy.
    Uses the Triton kernel for CUDA tensors when triton is installed, the PyTorch fallback otherwise.
    """
    if hidden.is_cuda and triton is not None:
        return srgen_loss_and_grad_triton(hidden, delta, weight, targets, temperature, lam, chunk_size)
    return srgen_loss_and_grad_torch(hidden, delta, weight, targets, temperature, lam, chunk_size)


def srgen_loss_and_grad_torch(
    hidden: Tensor,
    delta: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    lam: float,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """PyTorch version of srgen_loss_and_grad(); works on any device."""
    return _loss_and_grad(hidden, delta, weight, targets, temperature, lam, chunk_size, _ce_chunk_torch)


def srgen_loss_and_grad_triton(
    hidden: Tensor,
    delta: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    lam: float,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Triton version of srgen_loss_and_grad(): matmuls stay in torch (cuBLAS), the per-chunk softmax is Triton.

    Meant for CUDA tensors; also runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """
    if triton is None:
        raise RuntimeError("srgen_loss_and_grad_triton needs triton, which is not installed")
    return _loss_and_grad(hidden, delta, weight, targets, temperature, lam, chunk_size, _ce_chunk_triton)


def _loss_and_grad(
    hidden: Tensor,
    delta: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    lam: float,
    chunk_size: int,
    ce_chunk: CeChunk,
) -> tuple[Tensor, Tensor]:
    """The loss and gradient, with `ce_chunk` doing the softmax / cross-entropy work for each chunk."""
    _check_inputs(hidden, delta, weight, targets)
    positions = hidden.shape[0]
    # dloss/dz summed over positions: the one V-sized accumulator, turned into dloss/ddelta by one matmul at the end.
    dloss_dz = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)

    if positions > 1:
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, positions - 1, chunk_size):
            stop = min(start + chunk_size, positions - 1)
            logits = _logits(hidden[start:stop], delta, weight)
            ce_sum += ce_chunk(logits, targets[start:stop])
            dloss_dz += logits.sum(dim=0)  # the chunk now holds softmax - onehot, i.e. dCE/dz per position
        ce_weight = (1.0 - lam) / (positions - 1)
        loss += ce_weight * ce_sum
        dloss_dz *= ce_weight

    entropy, dentropy_dz = _entropy_and_grad(_logits(hidden[-1], delta, weight), temperature)
    loss += lam * entropy
    dloss_dz += lam * dentropy_dz
    return loss, (dloss_dz.to(weight.dtype) @ weight).float()


def _logits(hidden: Tensor, delta: Tensor, weight: Tensor) -> Tensor:
    """float32 logits (hidden + delta) @ weight.T, with the matmul in weight.dtype (a no-op cast for float32)."""
    shifted = hidden.float() + delta.float()
    return (shifted.to(weight.dtype) @ weight.T).float()


def _check_inputs(hidden: Tensor, delta: Tensor, weight: Tensor, targets: Tensor) -> None:
    """Raise ValueError on inconsistent shapes or out-of-vocabulary targets, before any kernel runs.

    A target outside [0, V) (vLLM's async scheduling writes -1 for a token not sampled yet) would otherwise be
    read out of bounds by the kernel or fail on a device assert. Checking it costs one reduction and one sync.
    """
    _check_shapes(hidden, delta, weight, targets)
    if targets.numel() > 0:
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}), got values from {low} to {high}")


def _check_shapes(hidden: Tensor, delta: Tensor, weight: Tensor, targets: Tensor) -> None:
    """Raise ValueError on inconsistent shapes, which would otherwise broadcast silently or fail deep inside."""
    positions, dim = hidden.shape
    if positions == 0:
        raise ValueError("hidden has no positions")
    if delta.shape != (dim,) or weight.ndim != 2 or weight.shape[1] != dim:
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden.shape)}, delta {tuple(delta.shape)}, "
            f"weight {tuple(weight.shape)}; expected [L, d], [d], [V, d]"
        )
    if targets.shape != (positions - 1,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected [{positions - 1}] for L = {positions}")


def _entropy_and_grad(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """H(softmax(logits / T)) and dH/dlogits = -p (log p + H) / T, for one row of finite logits."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum()
    return entropy, -p * (log_p + entropy) / temperature


def _ce_chunk_torch(logits: Tensor, targets: Tensor) -> Tensor:
    """PyTorch CeChunk: summed cross-entropy; logits become softmax - onehot in place."""
    lse = torch.logsumexp(logits, dim=-1)
    ce_sum = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    logits.sub_(lse[:, None]).exp_()
    logits[torch.arange(logits.shape[0], device=logits.device), targets] -= 1.0
    return ce_sum


def _ce_chunk_triton(logits: Tensor, targets: Tensor) -> Tensor:
    """Triton CeChunk: one program per row; logits become softmax - onehot in place."""
    rows, vocab = logits.shape
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _ce_residual_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        vocab,
        ce,
        BLOCK=min(triton.next_power_of_2(vocab), _MAX_BLOCK),
    )
    return ce.sum()


if triton is not None:

    @triton.jit
    def _ce_residual_kernel(logits_ptr, row_stride, targets_ptr, vocab, ce_ptr, BLOCK: tl.constexpr):
        """One row: pass 1 gets logsumexp (online max / sum-exp) and CE; pass 2 rewrites the row as p - onehot."""
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride  # chunk_size * V can pass 2^31 elements
        target = tl.load(targets_ptr + row)
        # Callers check targets are in [0, vocab); should one slip through, its CE reads as NaN, not stray memory.
        target_in_row = (target >= 0) & (target < vocab)
        cols = tl.arange(0, BLOCK)

        # Logits from a matmul are finite, so starting m at -inf is safe: the first block sets it.
        m = float("-inf")
        z = 0.0
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(z)
        tl.store(ce_ptr + row, lse - tl.load(row_ptr + target, mask=target_in_row, other=float("nan")))

        for start in range(0, vocab, BLOCK):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=float("-inf"))
            residual = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(row_ptr + offs, residual, mask=in_row)
