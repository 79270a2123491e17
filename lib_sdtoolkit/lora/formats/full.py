"""Full / diff: the file holds ΔW itself (``diff``) and optionally Δbias (``diff_b``)."""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "full"


def accepts(parts: Set[str]) -> bool:
    return "diff" in parts and parts <= {"diff", "diff_b"}


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return False


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    d = t["diff"]
    if d.numel() != weight.numel():
        raise ValueError(f"diff has shape {list(d.shape)}, the target weight {list(weight.shape)}")
    b = t.get("diff_b")
    return d.reshape(weight.shape), (b.reshape(-1) if b is not None else None)
