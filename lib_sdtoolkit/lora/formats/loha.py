"""LoHa (LyCORIS): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores ``hada_t1/t2`` (r, r, k, k) each half is
einsum(t, a, b) where ``hada_wX_a`` is (r, out) and ``hada_wX_b`` (r, in) (the LyCORIS layout)."""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "loha"
_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


def accepts(parts: Set[str]) -> bool:
    return _PARTS <= parts and parts <= _PARTS | {"hada_t1", "hada_t2"}


def rank(t: Dict[str, torch.Tensor]) -> int:
    return int(t["hada_w1_b"].shape[0])


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return True


def _half(a: torch.Tensor, b: torch.Tensor, core: Optional[torch.Tensor]) -> torch.Tensor:
    if core is not None:
        # core[i,j,...] a[i,p] b[j,r] -> [p, r, ...]
        return torch.einsum("ij...,ip,jr->pr...", core, a, b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"rank mismatch: hada a has rank {a.shape[1]}, b {b.shape[0]}")
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    d1 = _half(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
    d2 = _half(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
    return (d1 * d2).reshape(weight.shape), None
