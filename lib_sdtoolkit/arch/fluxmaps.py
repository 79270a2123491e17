"""Flux.1 module names: BFL <-> diffusers, and the LoRA targets of each, as pure name arithmetic.

BFL's transformer fuses what diffusers keeps apart:

* ``double_blocks.N.img_attn.qkv`` (rows q|k|v, each ``h`` rows) <- ``transformer_blocks.N.attn.to_q|to_k|to_v``;
  ``txt_attn.qkv`` <- ``attn.add_q_proj|add_k_proj|add_v_proj``;
* ``single_blocks.N.linear1`` (rows q|k|v|mlp = h|h|h|4h) <- ``single_transformer_blocks.N.attn.to_q|to_k|to_v``
  and ``proj_mlp``; ``linear2`` (input columns [attn_out, mlp_out]) = ``proj_out``;
* ``final_layer.adaLN_modulation.1`` (rows shift|scale) = ``norm_out.linear`` with its halves swapped (diffusers'
  ``AdaLayerNormContinuous`` chunks scale first). The other modulations keep their order: ``img_mod.lin`` =
  ``norm1.linear``, ``txt_mod.lin`` = ``norm1_context.linear``, ``modulation.lin`` = ``norm.linear``
  (shift, scale, gate in both), as diffusers' own converter
  (``convert_flux_transformer_checkpoint_to_diffusers``) maps them.

A row range is written in units of the module's input width ``h`` (every fused Flux module has ``h`` input
features: ``qkv`` is ``(3h, h)``, ``linear1`` ``(7h, h)``, the final modulation ``(2h, h)``), so the maps hold for
any width, the tiny test models included. Nothing here needs a key list or a tensor.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

#: Flux.1's depths
DEPTH, DEPTH_SINGLE = 19, 38
#: the input channels of ``img_in``: packed 2x2 patches of the 16-channel latent (Fill/Canny/Depth models take more)
LATENT_CHANNELS = 64

#: (diffusers module under a double block, BFL module under the double block, (first row unit, units) or None)
_DOUBLE: Tuple[Tuple[str, str, Optional[Tuple[int, int]]], ...] = (
    ("attn.to_q", "img_attn.qkv", (0, 1)), ("attn.to_k", "img_attn.qkv", (1, 1)),
    ("attn.to_v", "img_attn.qkv", (2, 1)),
    ("attn.add_q_proj", "txt_attn.qkv", (0, 1)), ("attn.add_k_proj", "txt_attn.qkv", (1, 1)),
    ("attn.add_v_proj", "txt_attn.qkv", (2, 1)),
    ("attn.to_out.0", "img_attn.proj", None), ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None), ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None), ("ff_context.net.2", "txt_mlp.2", None),
    ("norm1.linear", "img_mod.lin", None), ("norm1_context.linear", "txt_mod.lin", None),
)
_SINGLE: Tuple[Tuple[str, str, Optional[Tuple[int, int]]], ...] = (
    ("attn.to_q", "linear1", (0, 1)), ("attn.to_k", "linear1", (1, 1)), ("attn.to_v", "linear1", (2, 1)),
    ("proj_mlp", "linear1", (3, 4)), ("proj_out", "linear2", None), ("norm.linear", "modulation.lin", None),
)
#: (diffusers module, BFL module, swap halves) outside the blocks
_TOP: Tuple[Tuple[str, str, bool], ...] = (
    ("x_embedder", "img_in", False), ("context_embedder", "txt_in", False),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", False),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", False),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", False),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", False),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", False),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", False),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", True), ("proj_out", "final_layer.linear", False),
)

#: the qk-norms (RMSNorm): (diffusers module, BFL module) under a double / single block; BFL calls the parameter
#: ``scale``, diffusers ``weight``. A Flux control LoRA (BFL's Canny/Depth LoRAs) replaces them.
_DOUBLE_NORMS: Tuple[Tuple[str, str], ...] = (
    ("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm"),
)
_SINGLE_NORMS: Tuple[Tuple[str, str], ...] = (("attn.norm_q", "norm.query_norm"), ("attn.norm_k", "norm.key_norm"))

#: the Linear layers of CLIP-L (transformers names) and of T5-XXL's encoder a Flux LoRA may carry
CLIP_L_LAYERS = 12
T5_BLOCKS = 24


@functools.lru_cache(maxsize=None)
def diffusers_to_bfl(depth: int = DEPTH, depth_single: int = DEPTH_SINGLE
                     ) -> Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]]:
    """diffusers module path -> (BFL module path, row range in units of the input width or None, swap halves)."""
    out: Dict[str, Tuple[str, Optional[Tuple[int, int]], bool]] = {}
    for d, b, swap in _TOP:
        out[d] = (b, None, swap)
    for i in range(depth):
        for d, b, rows in _DOUBLE:
            out[f"transformer_blocks.{i}.{d}"] = (f"double_blocks.{i}.{b}", rows, False)
    for i in range(depth_single):
        for d, b, rows in _SINGLE:
            out[f"single_transformer_blocks.{i}.{d}"] = (f"single_blocks.{i}.{b}", rows, False)
    return out


@functools.lru_cache(maxsize=None)
def bfl_to_diffusers(depth: int = DEPTH, depth_single: int = DEPTH_SINGLE
                     ) -> Dict[str, List[Tuple[str, Optional[Tuple[int, int]], bool]]]:
    """BFL module path -> its diffusers pieces [(diffusers module, rows of the BFL module or None, swap)], in row
    order."""
    out: Dict[str, List[Tuple[str, Optional[Tuple[int, int]], bool]]] = {}
    for d, (b, rows, swap) in diffusers_to_bfl(depth, depth_single).items():
        out.setdefault(b, []).append((d, rows, swap))
    for v in out.values():
        v.sort(key=lambda p: p[1][0] if p[1] else 0)
    return out


def bfl_modules(depth: int = DEPTH, depth_single: int = DEPTH_SINGLE) -> List[str]:
    """Every BFL Linear module a LoRA can target (no norms), in checkpoint order."""
    return list(bfl_to_diffusers(depth, depth_single))


@functools.lru_cache(maxsize=None)
def norm_modules(depth: int = DEPTH, depth_single: int = DEPTH_SINGLE) -> Dict[str, str]:
    """BFL qk-norm module (parameter ``scale``) -> its diffusers module (parameter ``weight``), in checkpoint
    order."""
    out: Dict[str, str] = {}
    for i in range(depth):
        for d, b in _DOUBLE_NORMS:
            out[f"double_blocks.{i}.{b}"] = f"transformer_blocks.{i}.{d}"
    for i in range(depth_single):
        for d, b in _SINGLE_NORMS:
            out[f"single_blocks.{i}.{b}"] = f"single_transformer_blocks.{i}.{d}"
    return out


def units(bfl_module: str) -> int:
    """How many input widths of rows ``bfl_module``'s weight has (qkv 3, linear1 7, final modulation 2; else 0 =
    not a fused module)."""
    if bfl_module.endswith(("img_attn.qkv", "txt_attn.qkv")):
        return 3
    if bfl_module.endswith(".linear1"):
        return 7
    if bfl_module == "final_layer.adaLN_modulation.1":
        return 2
    return 0


def clip_l_modules() -> List[str]:
    out = []
    for i in range(CLIP_L_LAYERS):
        b = f"text_model.encoder.layers.{i}."
        out += [b + m for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                "mlp.fc1", "mlp.fc2")]
    return out


def t5_modules() -> List[str]:
    out = []
    for i in range(T5_BLOCKS):
        b = f"encoder.block.{i}.layer."
        out += [b + "0.SelfAttention." + m for m in "qkvo"]
        out += [b + "1.DenseReluDense." + m for m in ("wi_0", "wi_1", "wo")]
    return out


_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


_IN_RE = re.compile(r"^(img_in|txt_in|time_in|vector_in|guidance_in)(\.|$)")


def lbw_block(bfl_module: str) -> str:
    """The LoRA block-weight block of a BFL transformer module, in lora-block-weight's Flux vocabulary: ``Dnn`` /
    ``Snn`` for the numbered blocks, ``IN`` for the embedders (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
    ``guidance_in``), ``OUT`` for ``final_layer``; ``BASE`` for anything else (no such module in Flux.1). IN and OUT
    are parts of our BASE (:data:`lib_sdtoolkit.arch.blocks.FLUX_BASE_PARTS`)."""
    m = _BLOCK_RE.match(bfl_module)
    if not m:
        if _IN_RE.match(bfl_module):
            return "IN"
        return "OUT" if bfl_module.startswith("final_layer.") else "BASE"
    return ("D" if m.group(1) == "double_blocks" else "S") + f"{int(m.group(2)):02d}"


__all__ = ["DEPTH", "DEPTH_SINGLE", "LATENT_CHANNELS", "diffusers_to_bfl", "bfl_to_diffusers", "bfl_modules", "norm_modules", "units",
           "clip_l_modules", "t5_modules", "lbw_block"]
