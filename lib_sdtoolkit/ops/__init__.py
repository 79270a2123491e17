"""The tensor-ops library: pure functions on tensors (merge maths, LoRA deltas, SVD, GroupNorm, tile blending).

Each feature adds its own submodule (``ops.merge``, ...); this package imports none of them so that importing
one op never pays for the others. Every op takes tensors on any device; optional CUDA/Triton kernels live beside
their PyTorch fallback and are chosen at run time.
"""
