"""Synthetic network files with real key layouts, for tests, benchmarks and the sample library.

``make_lora_state_dict(shapes, arch, rank, ...)`` writes kohya-named factors for the targets of ``arch`` whose
weight shapes are given (``ModelBinding.target_shape`` or a checkpoint's header), so a file made for a tiny model
has the key names of a real one.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .names import lora_names


def _default_filter(name: str) -> bool:
    return True


def attention_and_conv(name: str) -> bool:
    """Attention projections, feed-forward, proj_in/out and resnet/sampler convs (a LoCon's usual set)."""
    keys = ("attn1_", "attn2_", "_ff_net_", "proj_in", "proj_out", "_conv1", "_conv2", "conv_shortcut",
            "downsamplers_0_conv", "upsamplers_0_conv", "self_attn_", "_mlp_fc")
    return any(k in name + "_" for k in keys)


def make_lora_state_dict(shape_of: Callable[[str], Optional[Tuple[int, ...]]], arch: str, rank: int = 4,
                         alpha: Optional[float] = None, seed: int = 0, scale: float = 0.1,
                         name_filter: Callable[[str], bool] = _default_filter, conv_kxk: bool = True,
                         dtype: torch.dtype = torch.float32, kohya_only: bool = True) -> Dict[str, torch.Tensor]:
    """kohya LoRA/LoCon factors (``lora_down``/``lora_up``/``alpha``) for every target of ``arch`` that
    ``name_filter`` accepts and whose weight ``shape_of(weight_key)`` knows. One name per target (the spelling
    kohya writes: diffusers paths for SD1/SD2 UNets, sgm paths for SDXL)."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tgt in lora_names(arch).items():
        key = (tgt.weight_key, tgt.qkv_index)
        if key in seen or not name_filter(name):
            continue
        if kohya_only and name.startswith("lora_unet_") and not arch.startswith("SDXL") and (
                "input_blocks" in name or "middle_block" in name or "output_blocks" in name):
            continue
        s = shape_of(tgt.weight_key)
        if s is None or len(s) < 2:
            continue
        if tgt.qkv_index is not None:
            s = (s[0] // 3, *s[1:])
        if len(s) == 4 and s[2:] != (1, 1) and not conv_kxk:
            continue
        seen.add(key)
        r = min(rank, s[0], s[1])
        down_shape = (r, *s[1:]) if len(s) == 4 else (r, s[1])
        up_shape = (s[0], r, 1, 1) if len(s) == 4 else (s[0], r)
        sd[name + ".lora_down.weight"] = (torch.randn(down_shape, generator=g) * scale).to(dtype)
        sd[name + ".lora_up.weight"] = (torch.randn(up_shape, generator=g) * scale).to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(alpha if alpha is not None else r / 2), dtype=dtype)
    return sd
