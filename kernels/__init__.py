"""GPU kernels (Triton) with PyTorch CPU fallbacks for the in-engine policies.

- `refine_server.kernels.distribution_stats`: entropy, varentropy and top-2 margin of each row of logits (and, on
  request, its log normaliser).
- `refine_server.kernels.srgen_loss`: SRGen's reflection loss and its gradient with respect to the
  corrective vector delta, chunked over positions so the [L, V] logits never exist at once; it takes the
  engine's own bfloat16 / float16 LM head as is (16-bit GEMMs, float32 results), or a float32 one.

Each public function runs its Triton kernel for CUDA tensors when triton is installed and its PyTorch
version otherwise; the `*_torch` and `*_triton` variants are exported for tests and benchmarks.
Import from the submodules (`from refine_server.kernels.distribution_stats import token_stats`): this package
re-exports nothing, so importing it does not import torch or triton.
"""
