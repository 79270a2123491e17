"""LoKr (LyCORIS): ΔW = kron(W1, W2), W1 = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; W2 = ``lokr_w2``, or
``lokr_w2_a @ lokr_w2_b`` (conv: w2_b is (r, d·k·k)), or the Tucker form einsum(``lokr_t2``, w2_a (r, b), w2_b (r, d)).
For conv W1 gets unit spatial dims, so kron gives (a·b, c·d, k, k). alpha/rank applies only when a half is
decomposed (with both halves full LyCORIS writes alpha = dim; here scale = 1 then)."""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "lokr"


def accepts(parts: Set[str]) -> bool:
    has1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    allowed = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    return has1 and has2 and parts <= allowed


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    if "lokr_w1_b" in t:
        return int(t["lokr_w1_b"].shape[0])
    if "lokr_w2_b" in t:
        return int(t["lokr_w2_b"].shape[0])
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return rank(t) is not None


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    w1 = t.get("lokr_w1")
    if w1 is None:
        a, b = t["lokr_w1_a"], t["lokr_w1_b"]
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"rank mismatch: lokr_w1_a has rank {a.shape[1]}, lokr_w1_b {b.shape[0]}")
        w1 = a @ b
    w2 = t.get("lokr_w2")
    if w2 is None:
        a, b, core = t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2")
        if core is not None:
            w2 = torch.einsum("ij...,ip,jr->pr...", core, a, b)
        else:
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"rank mismatch: lokr_w2_a has rank {a.shape[1]}, lokr_w2_b {b.shape[0]}")
            w2 = a @ b.reshape(b.shape[0], -1)
            if weight.dim() > 2:
                w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()).reshape(weight.shape), None
