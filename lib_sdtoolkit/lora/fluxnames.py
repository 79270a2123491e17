"""Flux.1 LoRA module names in every spelling trainers write, onto BFL targets (a fused weight and a row offset).

Spellings (``h`` = the hidden width; ``N`` a block number):

* **kohya / sd-scripts**: ``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_linear1``,
  ``lora_unet_final_layer_adaLN_modulation_1``..., ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``
  (CLIP-L; ``lora_te_`` too), ``lora_te2_encoder_block_0_layer_0_SelfAttention_q`` (T5). LyCORIS LoHa/LoKr files
  use the same names.
* **diffusers / PEFT / ai-toolkit**: ``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` (``to_k``,
  ``to_v``, ``add_q_proj``... onto row thirds of ``img_attn.qkv`` / ``txt_attn.qkv``),
  ``transformer.single_transformer_blocks.N.attn.to_q`` / ``proj_mlp`` (rows of ``linear1``), ``proj_out``
  (``linear2``), ``norm1.linear`` / ``norm1_context.linear`` / ``norm.linear`` (the modulations, same order),
  ``norm_out.linear`` (the final modulation, halves swapped); also under ``base_model.model.`` (PEFT) and
  ``text_encoder.`` (CLIP-L); SimpleTuner's kohya-style ``lora_transformer_...`` and ``lycoris_...``.
* **XLabs**: ``double_blocks.N.processor.qkv_lora1.down.weight`` (img qkv), ``qkv_lora2`` (txt qkv),
  ``proj_lora1`` / ``proj_lora2`` (the attention projections), ``single_blocks.N.processor.qkv_lora`` (the
  q|k|v rows of ``linear1``); no alpha (scale 1). The single blocks' ``proj_lora`` acts on the block's output, not
  on a weight, and is reported as unmatched.
* **BFL / ComfyUI**: ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`` (also bare and under
  ``model.diffusion_model.`` / ``transformer.``), ``text_encoders.clip_l.transformer.text_model...``.
* **ComfyUI / Forge Neo key-map extras** (Neo's ``modules_forge/packages/comfy/lora.py`` ``model_lora_keys_unet`` /
  ``_clip``, ComfyUI's ``comfy/lora.py``): ``diffusion_model.single_blocks.N.linear1_qkv`` is the q|k|v rows of
  ``linear1`` (the key map's offset ``(0, 0, 3h)``; the mlp rows stay untouched), and T5-XXL's kohya names are
  ``lora_te2_`` *and* ``lora_te3_`` (beside CLIP-L the map gives T5 both indices; Forge 2.0.1's ``lora_te3_`` too).

Targets are :class:`~lib_sdtoolkit.arch.keymaps.LoraTarget` with ``component`` ``transformer`` / ``text_encoder``
(CLIP-L) / ``text_encoder_2`` (T5) and ``module`` the path *inside* that component (``double_blocks.0.img_attn.qkv``,
``text_model.encoder.layers.0.self_attn.q_proj``): where it lives in a given checkpoint is the bake's business.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

from ..arch import fluxmaps
from ..arch.keymaps import LoraTarget

ARCH = "Flux.1"

#: part suffixes (longest first) -> the part name :mod:`lib_sdtoolkit.lora.formats` knows
_PARTS: Tuple[Tuple[str, str], ...] = tuple(sorted({
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "lora_mid.weight": "lora_mid.weight",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "alpha": "alpha", "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm", "set_weight": "set_weight",
    # PEFT ``lora_bias=True`` and BFL's control LoRAs: a bias on lora_B, the layer's Δbias (scaled as ΔW)
    "lora_B.bias": "lora_up.bias", "lora_up.bias": "lora_up.bias",
}.items(), key=lambda kv: -len(kv[0])))
#: XLabs processor LoRAs: ``.down.weight`` / ``.up.weight``
_XLABS_PART = re.compile(r"^(?P<mod>(?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
                         r"\.(?P<part>down|up)\.weight$")
_XLABS_MOD = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)$")

#: dotted prefixes of the transformer's modules (longest first) and the naming each says
_TRANSFORMER_ROOTS = (("base_model.model.transformer.", "peft"), ("base_model.model.", "peft"),
                      ("model.diffusion_model.", "comfy"), ("diffusion_model.", "comfy"),
                      ("transformer.", "diffusers"), ("", "bare"))
_TE_ROOTS = (("base_model.model.text_encoder.", "text_encoder", "peft"),
             ("base_model.model.text_encoder_2.", "text_encoder_2", "peft"),
             ("text_encoders.clip_l.transformer.", "text_encoder", "comfy"), ("text_encoder.", "text_encoder", "diffusers"),
             ("text_encoders.t5xxl.transformer.", "text_encoder_2", "comfy"),
             ("text_encoder_2.", "text_encoder_2", "diffusers"))


@functools.lru_cache(maxsize=None)
def _tables() -> Tuple[Dict[str, LoraTarget], Dict[str, LoraTarget], Dict[str, LoraTarget], Dict[str, LoraTarget]]:
    """(BFL dotted, diffusers dotted, underscore names, text-encoder dotted) -> target."""
    bfl: Dict[str, LoraTarget] = {}
    diff: Dict[str, LoraTarget] = {}
    us: Dict[str, LoraTarget] = {}
    te: Dict[str, LoraTarget] = {}
    for m in fluxmaps.bfl_modules():
        t = LoraTarget(m, "transformer")
        bfl[m] = t
        us["lora_unet_" + m.replace(".", "_")] = t
        if m.startswith("single_blocks.") and m.endswith(".linear1"):   # ComfyUI / Neo: the q|k|v rows of linear1
            bfl[m + "_qkv"] = LoraTarget(m, "transformer", rows=(0, 3))
    for b, d in fluxmaps.norm_modules().items():   # the qk-norms a control LoRA sets
        t = LoraTarget(b, "transformer", param="scale")
        bfl[b] = t
        diff[d] = t
    for d, (b, rows, swap) in fluxmaps.diffusers_to_bfl().items():
        t = LoraTarget(b, "transformer", rows=rows, swap=swap)
        diff[d] = t
        us["lora_transformer_" + d.replace(".", "_")] = t
        us["lycoris_" + d.replace(".", "_")] = t
    for m in fluxmaps.clip_l_modules():
        t = LoraTarget(m, "text_encoder")
        te["text_encoder:" + m] = t
        us["lora_te1_" + m.replace(".", "_")] = t
        us["lora_te_" + m.replace(".", "_")] = t
    for m in fluxmaps.t5_modules():
        t = LoraTarget(m, "text_encoder_2")
        te["text_encoder_2:" + m] = t
        us["lora_te2_" + m.replace(".", "_")] = t
        us["lora_te3_" + m.replace(".", "_")] = t
    return bfl, diff, us, te


#: a qk-norm's new value in a control LoRA: BFL's ``...query_norm.scale`` / ``key_norm.scale``, diffusers'
#: ``attn.norm_q.weight`` (``norm_k``, ``norm_added_q``, ``norm_added_k``) as its Flux Control loader takes them
_NORM_SET = re.compile(r"^(?P<mod>.*(?:\.(?:query|key)_norm|\.attn\.norm_(?:added_)?[qk]))\.(?:scale|weight)$")


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """(module name as the file spells it, part name) of a Flux LoRA file key; None if no part is recognised.

    A qk-norm's parameter itself (BFL ``query_norm.scale``, diffusers ``attn.norm_q.weight``) is the part
    ``set_weight``: a control LoRA stores the norm's new value (ComfyUI renames it so)."""
    m = _XLABS_PART.match(key)
    if m:
        return m.group("mod"), "lora_" + m.group("part") + ".weight"
    m = _NORM_SET.match(key)
    if m:
        return m.group("mod"), "set_weight"
    head = key.split(".", 1)[0]
    if "." in key and head.startswith(("lora_", "lycoris_")) and not head.startswith(("lora_A", "lora_B")):
        mod, part = key.split(".", 1)
        return mod, dict(_PARTS).get(part, part)
    for suffix, part in _PARTS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    return None


def _xlabs_target(mod: str) -> Optional[LoraTarget]:
    m = _XLABS_MOD.match(mod)
    if not m:
        return None
    kind, n, what, idx = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "double":
        if idx not in ("1", "2"):
            return None
        side = "img" if idx == "1" else "txt"
        return LoraTarget(f"double_blocks.{n}.{side}_attn.{'qkv' if what == 'qkv' else 'proj'}", "transformer")
    if what == "qkv" and idx == "":
        return LoraTarget(f"single_blocks.{n}.linear1", "transformer", rows=(0, 3))
    return None  # single-block proj_lora: a LoRA on the block's output, no weight of the checkpoint


def resolve(mod: str) -> Optional[LoraTarget]:
    """The target of a module name (any spelling above), or None."""
    bfl, diff, us, te = _tables()
    t = us.get(mod)
    if t is not None:
        return t
    t = _xlabs_target(mod)
    if t is not None:
        return t
    for root, comp, _ in _TE_ROOTS:
        if mod.startswith(root):
            return te.get(f"{comp}:{mod[len(root):]}")
    for root, _ in _TRANSFORMER_ROOTS:
        if root and not mod.startswith(root):
            continue
        rest = mod[len(root):]
        t = bfl.get(rest) or diff.get(rest)
        if t is not None:
            return t
    return None


def naming(mod: str) -> str:
    """Which naming a module name is written in: ``kohya``, ``diffusers``, ``peft``, ``comfy`` (BFL names under
    ``diffusion_model.``), ``bfl`` (bare BFL names), ``xlabs``, ``simpletuner`` (``lora_transformer_`` /
    ``lycoris_``) or ``unknown``."""
    if _XLABS_MOD.match(mod):
        return "xlabs"
    if mod.startswith(("lora_unet_", "lora_te")):
        return "kohya"
    if mod.startswith(("lora_transformer_", "lycoris_")):
        return "simpletuner"
    for root, _, name in _TE_ROOTS:
        if mod.startswith(root):
            return name
    bfl, diff, _, _ = _tables()
    for root, name in _TRANSFORMER_ROOTS:
        if root and not mod.startswith(root):
            continue
        rest = mod[len(root):]
        if rest in bfl:
            return "bfl" if name in ("bare", "diffusers") else name
        if rest in diff:
            return "diffusers" if name == "bare" else name
    return "unknown"


def looks_like_flux(keys: List[str], metadata: Dict[str, str]) -> bool:
    """True when a LoRA file's names or metadata say Flux.1. diffusers-named double blocks at the root of the file
    (``transformer.transformer_blocks.N.``, PEFT's and SimpleTuner's spellings of it) are Flux's too: an SD UNet's
    ``transformer_blocks`` sit inside ``down_blocks``/``up_blocks``; SD3 (same names, no LoRA support here) only
    where its metadata does not say SD3."""
    ver = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "flux" in ver:
        return True
    sd3 = "sd3" in ver or "stable-diffusion-3" in ver
    for k in keys:
        if (k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_single_"))
                or "single_transformer_blocks." in k or ".processor.qkv_lora" in k or ".processor.proj_lora" in k
                or re.search(r"(^|\.)(double|single)_blocks\.\d+\.", k)):
            return True
        if not sd3 and (_DIFFUSERS_DOUBLE.match(k) or k.startswith(("lora_transformer_transformer_blocks_",
                                                                    "lycoris_transformer_blocks_"))):
            return True
    return False


_DIFFUSERS_DOUBLE = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?transformer_blocks\.\d+\.")


def block_of(target: LoraTarget) -> str:
    """The lora-block-weight block of a Flux target: CLIP (CLIP-L), T5, or the transformer module's
    (:func:`lib_sdtoolkit.arch.fluxmaps.lbw_block`: IN, Dnn, Snn, OUT)."""
    if target.component == "transformer":
        return fluxmaps.lbw_block(target.module)
    return {"text_encoder": "CLIP", "text_encoder_2": "T5"}.get(target.component, "BASE")


__all__ = ["ARCH", "split_key", "resolve", "naming", "looks_like_flux", "block_of"]
