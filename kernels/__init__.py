"""GPU kernels (Triton) with PyTorch CPU fallbacks for the in-engine policies."""
