"""Norm: new affine parameters for GroupNorm/LayerNorm as deltas, ``w_norm`` (ΔW) and ``b_norm`` (Δbias)."""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "norm"


def accepts(parts: Set[str]) -> bool:
    return "w_norm" in parts and parts <= {"w_norm", "b_norm"}


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return False


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    w = t["w_norm"]
    if w.numel() != weight.numel():
        raise ValueError(f"w_norm has {w.numel()} values, the norm layer {weight.numel()}")
    b = t.get("b_norm")
    return w.reshape(weight.shape), (b.reshape(-1) if b is not None else None)
