"""Set: the file holds the parameter's new value (``set_weight``), not a delta.

BFL's Flux control LoRAs (Canny/Depth dev) store the qk-norms' new ``scale`` this way; ComfyUI renames the key
``set_weight`` and replaces the weight (its ``set`` patch), diffusers' Flux Control loader loads them into the
norms. The hosts ignore the strength for it: the value is set whatever the multiplier, unless the multiplier is 0
(the network off). ΔW = new - W, so W + ΔW is the new value; callers apply it with :func:`lib_sdtoolkit.lora.formats.
effective_multiplier`.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "set"


def accepts(parts: Set[str]) -> bool:
    return parts == {"set_weight"}


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return False


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    v = t["set_weight"]
    if v.numel() != weight.numel():
        raise ValueError(f"set_weight has shape {list(v.shape)}, the parameter {list(weight.shape)}")
    return v.reshape(weight.shape) - weight, None
