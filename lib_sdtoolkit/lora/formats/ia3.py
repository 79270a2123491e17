"""(IA)^3: a learned vector ``weight`` scales the output rows (``on_input`` 0/absent) or the input columns of the
target: W' = W ⊙ (1 + m·w), i.e. ΔW = W ⊙ w."""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "ia3"


def accepts(parts: Set[str]) -> bool:
    return "weight" in parts and parts <= {"weight", "on_input"}


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return False


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    w = t["weight"].reshape(-1)
    on_input = "on_input" in t and bool(t["on_input"].reshape(-1)[0] != 0)
    if on_input:
        return weight * w.reshape(1, -1, *[1] * (weight.dim() - 2)), None
    return weight * w.reshape(-1, *[1] * (weight.dim() - 1)), None
