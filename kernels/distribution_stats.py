"""How uncertain each row of a next-token distribution is: entropy, varentropy and top-2 margin.

In-engine policies read these three numbers for every running request at every decode step, so on a GPU they
come from one Triton kernel that streams each row of logits twice and writes three floats per row, with no
[R, V] temporaries. Anywhere else (CPU tensors, no triton) a plain PyTorch version computes the same numbers.

For p = softmax(logits / T) over one row:
    entropy     H = -sum p log p                 (nats)
    varentropy  V = sum p (log p + H)^2          (variance of the surprisal -log p)
    margin        = p_top1 - p_top2              (gap between the two most likely tokens)
and, on request (`lse_out`), the log normaliser log sum exp(logits / T): with it, the probability of a token
chosen later (the one the sampler draws) is exp(logit / T - lse) without keeping a softmaxed copy of the row.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: token_stats() falls back to PyTorch
    triton = None

__all__ = ["TokenStats", "token_stats", "token_stats_torch", "token_stats_triton"]

TokenStats = tuple[Tensor, Tensor, Tensor]
"""(entropy, varentropy, margin), each float32 of shape [R]."""

# Widest slice of the vocabulary one program holds in registers at a time; 49152-token rows take 12 steps.
_MAX_BLOCK = 4096


def token_stats(logits: Tensor, temperature: Tensor | float = 1.0, *, lse_out: Tensor | None = None) -> TokenStats:
    """Entropy, varentropy and top-2 margin of softmax(logits / temperature), row by row.

    logits: [R, V], any float dtype; -inf marks a masked token (each row needs one finite entry).
    temperature: one float for all rows, or a [R] tensor; must be > 0 (pass 1.0 for greedy rows).
    lse_out: a float32 [R] tensor on the logits' device that receives log sum exp(logits / temperature).
    Runs the Triton kernel for CUDA tensors when triton is installed, the PyTorch fallback otherwise.
    """
    if logits.is_cuda and triton is not None:
        return token_stats_triton(logits, temperature, lse_out=lse_out)
    return token_stats_torch(logits, temperature, lse_out=lse_out)


def token_stats_torch(
    logits: Tensor, temperature: Tensor | float = 1.0, *, lse_out: Tensor | None = None
) -> TokenStats:
    """PyTorch version of token_stats(): works on any device. It keeps two [R, V] float32 tensors (log p and p)
    and works in place on them, since on a CPU engine each pass over a 152k-token row is a share of the step."""
    temps = _temperature_per_row(temperature, logits.shape[0], logits.device)
    log_p = logits.float() / temps[:, None]  # s = logits / T, then log p = s - lse in place
    lse = torch.logsumexp(log_p, dim=-1)
    if lse_out is not None:
        lse_out.copy_(lse)
    log_p.sub_(lse[:, None])
    p = log_p.exp()
    # Masked tokens have p = 0 and log p = -inf. A finite floor keeps 0 * log p and 0 * (log p + H)^2 at 0
    # instead of NaN; it changes nothing else, as exp(-1e4) is 0 in float32.
    log_p.clamp_(min=-1e4)
    entropy = -torch.linalg.vecdot(p, log_p)
    varentropy = torch.linalg.vecdot(p, log_p.add_(entropy[:, None]).square_())
    return entropy, varentropy, _top2_margin(p)


def token_stats_triton(
    logits: Tensor, temperature: Tensor | float = 1.0, *, lse_out: Tensor | None = None
) -> TokenStats:
    """Triton version of token_stats(): one program per row, two streaming passes over the vocabulary.

    Meant for CUDA tensors; also runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """
    if triton is None:
        raise RuntimeError("token_stats_triton needs triton, which is not installed")
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:  # the kernel walks a row with unit stride
        logits = logits.contiguous()
    temps = _temperature_per_row(temperature, rows, logits.device)
    entropy, varentropy, margin = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows > 0:  # a launch with an empty grid is an error
        _token_stats_kernel[(rows,)](
            logits,
            logits.stride(0),
            temps,
            vocab,
            entropy,
            varentropy,
            margin,
            entropy if lse_out is None else lse_out,  # a placeholder pointer when WRITE_LSE is off
            BLOCK=min(triton.next_power_of_2(vocab), _MAX_BLOCK),
            WRITE_LSE=lse_out is not None,
        )
    return entropy, varentropy, margin


def _temperature_per_row(temperature: Tensor | float, rows: int, device: torch.device) -> Tensor:
    """The temperature as a contiguous float32 [rows] tensor on `device`, whether given once or per row."""
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    return temps.broadcast_to((rows,)).contiguous()


def _top2_margin(probs: Tensor) -> Tensor:
    """p_top1 - p_top2 per row; a one-token vocabulary has no runner-up, so its margin is p_top1 = 1."""
    if probs.shape[-1] == 1:
        return probs[:, 0].clone()
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


if triton is not None:

    @triton.jit
    def _token_stats_kernel(
        logits_ptr,
        row_stride,
        temperature_ptr,
        vocab,
        entropy_ptr,
        varentropy_ptr,
        margin_ptr,
        lse_ptr,
        BLOCK: tl.constexpr,
        WRITE_LSE: tl.constexpr,
    ):
        """One row: pass 1 finds max, normaliser, entropy and the top two; pass 2 needs H for the varentropy.

        With s = logits / T and m the running max, pass 1 keeps z = sum e^(s-m) and a = sum e^(s-m) (s-m),
        rescaling both whenever m grows (online softmax). Then H = log z - a / z, and
        log p + H = s - m - a / z, which pass 2 squares and weights by p = e^(s-m) / z.
        """
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride  # R * V can pass 2^31 elements
        temperature = tl.load(temperature_ptr + row)
        cols = tl.arange(0, BLOCK)

        # A finite start for m: a block of only -inf then leaves m finite, so e^(m_old - m_new) and
        # (m_old - m_new) * z never meet -inf - -inf or -inf * 0, which would be NaN.
        m = -1e30
        z = 0.0
        a = 0.0
        top1 = float("-inf")
        top2 = float("-inf")
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            s = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) / temperature
            block_max = tl.max(s, axis=0)
            m_new = tl.maximum(m, block_max)
            rescale = tl.exp(m - m_new)
            w = tl.exp(s - m_new)
            # w == 0 where s = -inf (or underflows): zero s - m_new there first, as 0 * -inf would be NaN.
            block_a = tl.sum(w * tl.where(w > 0, s - m_new, 0.0), axis=0)
            a = rescale * (a + (m - m_new) * z) + block_a
            z = rescale * z + tl.sum(w, axis=0)
            m = m_new
            # The block's runner-up is its max with the argmax lane knocked out, so a tie keeps both copies.
            block_second = tl.max(tl.where(cols == tl.argmax(s, axis=0), float("-inf"), s), axis=0)
            top2 = tl.maximum(tl.minimum(top1, block_max), tl.maximum(top2, block_second))
            top1 = tl.maximum(top1, block_max)

        mean_shifted = a / z  # E_p[s - m]
        varentropy = 0.0
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            s = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) / temperature
            p = tl.exp(s - m) / z
            centred = tl.where(p > 0, s - m - mean_shifted, 0.0)  # log p + H, zeroed where p = 0 as above
            varentropy += tl.sum(p * centred * centred, axis=0)

        tl.store(entropy_ptr + row, tl.log(z) - mean_shifted)
        tl.store(varentropy_ptr + row, varentropy)
        tl.store(margin_ptr + row, (tl.exp(top1 - m) - tl.exp(top2 - m)) / z)
        if WRITE_LSE:
            tl.store(lse_ptr + row, m + tl.log(z))
