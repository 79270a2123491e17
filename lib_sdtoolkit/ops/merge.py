"""Checkpoint merge maths: pure functions on tensors.

Every function computes in float32 whatever the input dtypes (inputs are converted with :func:`f32`), and returns
a float32 tensor; the caller casts the result once to the output dtype. Ratios follow the WebUI's convention:
``m`` (alpha) is the share of B.

=================  ==========================================================
weighted_sum       ``A*(1-m) + B*m``
add_difference     ``A + (B-C)*m``
sum_twice          ``(1-beta)*((1-alpha)*A + alpha*B) + beta*C``
triple_sum         ``(1-alpha-beta)*A + alpha*B + beta*C``
ties               ``A + alpha * TIES(B-A, C-A; density)`` (trim, elect sign, disjoint mean)
dare               ``A + alpha * sum_i DARE(X_i-A; p)`` (drop with probability p, rescale by 1/(1-p))
=================  ==========================================================

TIES (Yadav et al. 2023): each task vector keeps its ``density`` fraction of largest-magnitude entries (entries
equal to the threshold are kept), the sign of each entry is elected as the sign of the sum of the trimmed
vectors, and the merged entry is the mean of the trimmed entries that agree with the elected sign.

DARE (Yu et al. 2023): each entry of each task vector is dropped with probability ``p`` and the survivors are
scaled by ``1/(1-p)``; the random mask comes from a CPU ``torch.Generator`` seeded with
:func:`key_seed` ``(seed, key, index)``, so a merge is reproducible on any device and in any key order.

What each method takes (models, ratios and their ranges, whether it can be chunked) is declared once, in
:mod:`lib_sdtoolkit.merge.methods`; this module holds only the maths.

``inplace=True`` lets a function overwrite its (already float32, caller-owned) inputs to save memory; the
rounding is the same as the out-of-place form.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence, Union

import torch

Number = Union[float, int]


def f32(t: torch.Tensor, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """``t`` as float32 on ``device`` (a new tensor unless it already is one)."""
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def weighted_sum(a: torch.Tensor, b: torch.Tensor, m: Number, inplace: bool = False) -> torch.Tensor:
    """``A*(1-m) + B*m``."""
    m = float(m)
    if inplace and a.dtype == torch.float32 and b.dtype == torch.float32:
        return a.mul_(1.0 - m).add_(b.mul_(m))
    return f32(a) * (1.0 - m) + f32(b) * m


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, m: Number,
                   inplace: bool = False) -> torch.Tensor:
    """``A + (B-C)*m``."""
    m = float(m)
    if inplace and a.dtype == b.dtype == c.dtype == torch.float32:
        return a.add_(b.sub_(c).mul_(m))
    return f32(a) + (f32(b) - f32(c)) * m


def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: Number, beta: Number,
              inplace: bool = False) -> torch.Tensor:
    """``(1-beta)*((1-alpha)*A + alpha*B) + beta*C``."""
    alpha, beta = float(alpha), float(beta)
    if inplace and a.dtype == b.dtype == c.dtype == torch.float32:
        ab = a.mul_(1.0 - alpha).add_(b.mul_(alpha))
        return ab.mul_(1.0 - beta).add_(c.mul_(beta))
    return (f32(a) * (1.0 - alpha) + f32(b) * alpha) * (1.0 - beta) + f32(c) * beta


def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: Number, beta: Number,
               inplace: bool = False) -> torch.Tensor:
    """``(1-alpha-beta)*A + alpha*B + beta*C``."""
    alpha, beta = float(alpha), float(beta)
    if inplace and a.dtype == b.dtype == c.dtype == torch.float32:
        return a.mul_(1.0 - alpha - beta).add_(b.mul_(alpha)).add_(c.mul_(beta))
    return f32(a) * (1.0 - alpha - beta) + f32(b) * alpha + f32(c) * beta


# ---------------------------------------------------------------------------------------------------------------
# TIES

def ties_trim(delta: torch.Tensor, density: Number) -> torch.Tensor:
    """Keep the ``density`` fraction (rounded up) of entries with the largest magnitude; zero the rest."""
    density = float(density)
    d = f32(delta)
    n = d.numel()
    if n == 0 or density >= 1.0:
        return d.clone()
    if density <= 0.0:
        return torch.zeros_like(d)
    k = max(1, int(math.ceil(density * n)))
    mag = d.abs().reshape(-1)
    # the k-th largest magnitude is the (n-k+1)-th smallest
    thr = torch.kthvalue(mag.cpu() if mag.device.type == "mps" else mag, n - k + 1).values.to(mag.device)
    return torch.where(d.abs() >= thr, d, torch.zeros((), dtype=d.dtype, device=d.device))


def ties_merge(deltas: Sequence[torch.Tensor], density: Number) -> torch.Tensor:
    """TIES-merge task vectors: trim each, elect the sign of the sum, average the entries that agree."""
    if not deltas:
        raise ValueError("ties_merge needs at least one task vector")
    trimmed = torch.stack([ties_trim(d, density) for d in deltas])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)).sum(dim=0)
    count = agree.sum(dim=0).to(torch.float32)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


def ties(a: torch.Tensor, others: Sequence[torch.Tensor], alpha: Number, density: Number) -> torch.Tensor:
    """``A + alpha * ties_merge([X - A for X in others], density)``."""
    a32 = f32(a)
    return a32 + ties_merge([f32(x, a32.device) - a32 for x in others], density) * float(alpha)


# ---------------------------------------------------------------------------------------------------------------
# DARE

def key_seed(seed: int, key: str, index: int = 0) -> int:
    """The generator seed for tensor ``key`` and task vector ``index``:
    ``(seed * 1000003 + crc32(f"{key}#{index}")) mod 2**63``."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{key}#{index}".encode("utf-8"))) % (2 ** 63)


def dare_mask(shape: Sequence[int], p: Number, seed: int) -> torch.Tensor:
    """Boolean keep-mask (CPU): ``rand >= p`` with ``rand`` drawn from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=g, dtype=torch.float32) >= float(p)


def dare_delta(delta: torch.Tensor, p: Number, seed: int) -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors by ``1/(1-p)``."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {p}")
    d = f32(delta)
    if p == 0.0:
        return d.clone()
    mask = dare_mask(d.shape, p, seed).to(d.device)
    return torch.where(mask, d / (1.0 - p), torch.zeros((), dtype=d.dtype, device=d.device))


def dare(a: torch.Tensor, others: Sequence[torch.Tensor], alpha: Number, p: Number, seed: int,
         key: str) -> torch.Tensor:
    """``A + alpha * sum_i dare_delta(X_i - A, p, key_seed(seed, key, i))``."""
    a32 = f32(a)
    acc = torch.zeros_like(a32)
    for i, x in enumerate(others):
        acc += dare_delta(f32(x, a32.device) - a32, p, key_seed(seed, key, i))
    return a32 + acc * float(alpha)


__all__ = ["f32", "weighted_sum", "add_difference", "sum_twice", "triple_sum", "ties_trim", "ties_merge", "ties",
           "key_seed", "dare_mask", "dare_delta", "dare"]
