"""File module name -> checkpoint target, on top of ``lib_sdtoolkit.arch.keymaps``.

``keymaps.kohya_lora_names(arch)`` (factory engineer) maps every kohya name of a Linear/Conv weight to its
checkpoint module (OpenCLIP q/k/v onto the fused ``in_proj``). This module adds what a LoRA *loader* needs beyond that,
scoped to LoRA loading:

* the compvis spelling of UNet names for SD1/SD2 (``lora_unet_input_blocks_1_1_proj_in``; the WebUI's fallback
  ``lora_unet`` -> ``diffusion_model``),
* GroupNorm/LayerNorm modules (1-D weights) for the ``norm`` network type,
* PEFT / diffusers dotted keys (``unet.down_blocks.0....to_q.lora_A.weight``, ``text_encoder.``, ``text_encoder_2.``,
  the old attention-processor spelling ``attn1.processor.to_q_lora.down.weight``) turned into kohya names,
* the lora-block-weight block of a target.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, Optional, Tuple

from ..arch import keymaps
from ..arch.keymaps import LoraTarget

_HF_TE = {"SD1": {"text_encoder": "lora_te_"}, "SD2": {"text_encoder": "lora_te_"},
          "SDXL": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
          "SDXL-refiner": {"text_encoder_2": "lora_te2_"}}


def base_arch(arch: str) -> str:
    for a in ("SDXL-refiner", "SDXL", "SD1", "SD2"):
        if arch == a or arch.startswith(a + "-"):
            return a
    raise ValueError(f"LoRA cannot be applied to architecture {arch!r}")


@functools.lru_cache(maxsize=None)
def lora_names(arch: str) -> Dict[str, LoraTarget]:
    """Every accepted kohya-style module name of ``arch`` -> target."""
    base = base_arch(arch)
    table = dict(keymaps.kohya_lora_names(base))
    layout = keymaps.load_layout(base)
    up = keymaps.UNET_PREFIX
    for k, shape in layout.items():
        if not k.startswith(up) or not k.endswith(".weight"):
            continue
        mod = k[len(up):-len(".weight")]
        target = LoraTarget(up + mod, "unet")
        ldm_name = "lora_unet_" + mod.replace(".", "_")
        if len(shape) >= 2:
            table.setdefault(ldm_name, target)
            continue
        if up + mod + ".bias" not in layout:
            continue
        table.setdefault(ldm_name, target)
        try:
            diff = keymaps.unet_ldm_key_to_diffusers(mod, base)
        except (KeyError, ValueError):
            continue
        table.setdefault("lora_unet_" + diff.replace(".", "_"), target)
    for comp, prefix, fmt in keymaps.TEXT_PREFIXES.get(base, []):
        if fmt != "hf":
            continue
        te = _HF_TE[base][comp]
        for k, shape in layout.items():
            if k.startswith(prefix) and k.endswith(".weight") and len(shape) == 1 and "norm" in k:
                mod = k[len(prefix):-len(".weight")]
                table.setdefault(te + mod.replace(".", "_"), LoraTarget(prefix + mod, comp))
    return table


_PEFT_PART = re.compile(r"^(?P<mod>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|"
                        r"lora_B\.default\.weight|lora\.down\.weight|lora\.up\.weight|lora_magnitude_vector(?:\.weight)?|"
                        r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
               "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
               "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
               "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
               "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale", "alpha": "alpha"}
_PEFT_ROOTS = (("unet.", "lora_unet_"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))


def split_key(key: str, arch: str) -> Optional[Tuple[str, str, bool]]:
    """(module name in kohya spelling, part name, is_peft) of a file key; None if it is no network key
    (``bundle_emb.*`` and unknown shapes of key)."""
    if key.startswith("bundle_emb."):
        return None
    for root, kind in _PEFT_ROOTS:
        if key.startswith(root):
            m = _PEFT_PART.match(key[len(root):])
            if not m:
                return None
            mod = m.group("mod")
            mod = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", mod)
            mod = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", mod)
            if kind == "lora_unet_":
                name = "lora_unet_" + mod.replace(".", "_")
            else:
                b = base_arch(arch)
                if kind == "te2":
                    name = "lora_te2_" + mod.replace(".", "_")
                else:
                    name = ("lora_te1_" if b.startswith("SDXL") else "lora_te_") + mod.replace(".", "_")
            return name, _PEFT_PARTS[m.group("part")], True
    if "." not in key:
        return None
    mod, part = key.split(".", 1)
    return mod, part, False


def resolve_name(name: str, arch: str) -> Optional[LoraTarget]:
    """The target of a kohya-spelled module name, or None."""
    table = lora_names(arch)
    t = table.get(name)
    if t is not None:
        return t
    b = base_arch(arch)
    # SDXL files sometimes say lora_te_ for the first encoder; SD1 files sometimes lora_te1_
    if b.startswith("SDXL") and name.startswith("lora_te_"):
        return table.get("lora_te1_" + name[len("lora_te_"):])
    return None


_BLOCK_RE = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d+)?")


def block_of_target(module: str) -> str:
    """lora-block-weight block of a checkpoint module: INnn / M00 / OUTnn for UNet blocks, BASE for the text
    encoders and for the UNet layers outside the numbered blocks (time_embed, out, label_emb)."""
    m = _BLOCK_RE.match(module)
    if not m:
        return "BASE"
    if m.group(1) == "middle_block":
        return "M00"
    return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
