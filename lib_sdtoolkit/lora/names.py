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
from ..arch.families import FAMILIES, base_arch
from ..arch.keymaps import LoraTarget
from . import fluxnames


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
    for te in FAMILIES[base].text_encoders:
        if te.layout != "hf":
            continue
        for k, shape in layout.items():
            if k.startswith(te.prefix) and k.endswith(".weight") and len(shape) == 1 and "norm" in k:
                mod = k[len(te.prefix):-len(".weight")]
                table.setdefault(te.kohya + mod.replace(".", "_"), LoraTarget(te.prefix + mod, te.component))
    return table


_PEFT_PART = re.compile(r"^(?P<mod>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|"
                        r"lora_B\.default\.weight|lora\.down\.weight|lora\.up\.weight|lora_magnitude_vector(?:\.weight)?|"
                        r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
               "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
               "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
               "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
               "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale", "alpha": "alpha"}
#: diffusers / PEFT component roots -> component
_PEFT_ROOTS = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))


def _kohya_te(component: str, arch: str) -> str:
    """The kohya prefix of a text encoder of ``arch``; for a component the architecture lacks, the SDXL spelling
    (the name then matches nothing and is reported as unmatched)."""
    try:
        return FAMILIES[base_arch(arch)].text_encoder(component).kohya
    except KeyError:
        return "lora_te2_" if component == "text_encoder_2" else "lora_te1_"


def is_flux(arch: str) -> bool:
    return arch.startswith("Flux")


def split_key(key: str, arch: str) -> Optional[Tuple[str, str, bool]]:
    """(module name in kohya spelling, part name, is_peft) of a file key; None if it is no network key
    (``bundle_emb.*`` and unknown shapes of key). Flux: the module name as the file spells it
    (:mod:`lib_sdtoolkit.lora.fluxnames`)."""
    if key.startswith("bundle_emb."):
        return None
    if is_flux(arch):
        s = fluxnames.split_key(key)
        return None if s is None else (s[0], s[1], False)
    if key.startswith("base_model.model."):  # PEFT's own prefix over the diffusers names
        key = key[len("base_model.model."):]
    comfy = _comfy_key(key, arch)
    if comfy is not None:
        return comfy
    for root, component in _PEFT_ROOTS:
        if key.startswith(root):
            m = _PEFT_PART.match(key[len(root):])
            if not m:  # LyCORIS parts (hada_*, lokr_*, diff...) under diffusers module names
                s = fluxnames.split_key(key[len(root):])
                if s is None:
                    return None
                prefix = "lora_unet_" if component == "unet" else _kohya_te(component, arch)
                return prefix + s[0].replace(".", "_"), s[1], True
            mod = m.group("mod")
            mod = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", mod)
            mod = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", mod)
            prefix = "lora_unet_" if component == "unet" else _kohya_te(component, arch)
            name = prefix + mod.replace(".", "_")
            return name, _PEFT_PARTS[m.group("part")], True
    if "." not in key:
        return None
    mod, part = key.split(".", 1)
    return mod, part, False


#: ComfyUI's names of the text encoders (``text_encoders.clip_l.transformer.text_model...``) -> kohya prefix
_COMFY_TE = {"SD1": {"clip_l": "lora_te_"}, "SD2": {"clip_h": "lora_te_"},
             "SDXL": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}, "SDXL-refiner": {"clip_g": "lora_te2_"}}


def comfy_te_names(arch: str) -> Dict[str, str]:
    """kohya text-encoder prefix -> ComfyUI's text encoder name, for ``arch``."""
    try:
        return {v: k for k, v in _COMFY_TE[base_arch(arch)].items()}
    except (KeyError, ValueError):
        return {}


def _comfy_key(key: str, arch: str) -> Optional[Tuple[str, str, bool]]:
    """ComfyUI's spelling (``diffusion_model.<checkpoint module>.lora_up.weight``,
    ``text_encoders.clip_l.transformer.<HF CLIP module>...``) as (kohya name, part, False); None if not that."""
    if not key.startswith(("diffusion_model.", "text_encoders.")):
        return None
    s = fluxnames.split_key(key)
    if s is None:
        return None
    mod, part = s
    if mod.startswith("diffusion_model."):
        try:
            name = keymaps.kohya_name_of_module(keymaps.UNET_PREFIX + mod[len("diffusion_model."):], arch)
        except (KeyError, ValueError):
            return mod, part, False
        return name, part, False
    m = re.match(r"^text_encoders\.(\w+)\.transformer\.(.+)$", mod)
    if m:
        try:
            pre = _COMFY_TE[base_arch(arch)].get(m.group(1))
        except (KeyError, ValueError):
            pre = None
        if pre is not None:
            return pre + m.group(2).replace(".", "_"), part, False
    return mod, part, False


def resolve_name(name: str, arch: str) -> Optional[LoraTarget]:
    """The target of a kohya-spelled module name (Flux: any spelling of :mod:`.fluxnames`), or None."""
    if is_flux(arch):
        return fluxnames.resolve(name)
    table = lora_names(arch)
    t = table.get(name)
    if t is not None:
        return t
    b = base_arch(arch)
    # SDXL files sometimes say lora_te_ for the first encoder; SD1 files sometimes lora_te1_
    if b.startswith("SDXL") and name.startswith("lora_te_"):
        return table.get("lora_te1_" + name[len("lora_te_"):])
    return None
