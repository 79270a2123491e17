"""LoRA / LoCon: ΔW = up @ down (linear, conv 1x1, conv kxk flattened) or the CP form with ``lora_mid``.

Parts: ``lora_up.weight`` (out, r[,1,1]), ``lora_down.weight`` (r, in[,k,k]), optional ``lora_mid.weight``
(r, r, k, k); PEFT/diffusers ``lora_B.weight`` / ``lora_A.weight`` are renamed to up/down by the loader.
``lora_up.bias`` (PEFT ``lora_bias=True``, BFL's Flux control LoRAs: ``lora_B.bias``) is the layer's Δbias, scaled
like ΔW (PEFT adds ``lora_B(lora_A(x)) * scaling``, bias included).
CP: ΔW[i,j] = Σ_{n,m} mid[n,m] · up[i,n] · down[m,j]. DyLoRA ``dyn=d`` keeps the first d ranks
(scale stays alpha/full rank, as the file was trained).
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "lora"


def accepts(parts: Set[str]) -> bool:
    return {"lora_up.weight", "lora_down.weight"} <= parts and parts <= {"lora_up.weight", "lora_down.weight",
                                                                        "lora_mid.weight", "lora_up.bias"}


def rank(t: Dict[str, torch.Tensor]) -> int:
    return int(t["lora_down.weight"].shape[0])


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return True


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"rank mismatch: lora_up has rank {up.shape[1]}, lora_down {down.shape[0]}")
    if dyn is not None and 0 < dyn < down.shape[0]:
        up, down = up[:, :dyn], down[:dyn]
        if mid is not None:
            mid = mid[:dyn, :dyn]
    up2 = up.reshape(up.shape[0], up.shape[1])
    if mid is not None:
        down2 = down.reshape(down.shape[0], down.shape[1])
        dw = torch.einsum("nm...,in,mj->ij...", mid, up2, down2)
    else:
        dw = (up2 @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])
    db = t.get("lora_up.bias")
    return dw.reshape(weight.shape) if dw.numel() == weight.numel() else dw, (db.reshape(-1) if db is not None
                                                                               else None)
