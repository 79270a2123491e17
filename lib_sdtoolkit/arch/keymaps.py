"""Key-name maps between the layouts Stable Diffusion weights come in.

Three naming worlds meet in model files:

* **ldm / sgm** (what checkpoints and the WebUI use): ``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``,
  ``first_stage_model.encoder.down.0.block.0.conv1.weight``, OpenCLIP ``...model.transformer.resblocks.0.attn.in_proj_weight``;
* **diffusers / transformers**: ``down_blocks.0.resnets.0.norm1.weight``, ``encoder.down_blocks.0.resnets.0.conv1.weight``,
  HF CLIP ``text_model.encoder.layers.0.self_attn.q_proj.weight``;
* **kohya LoRA module names**: ``lora_unet_down_blocks_0_attentions_0_proj_in`` (SD1/SD2, diffusers paths with ``_``),
  ``lora_unet_input_blocks_4_1_proj_in`` (SDXL, sgm paths), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders
  (always HF CLIP paths, even where the checkpoint holds OpenCLIP weights).

Everything here is pure name arithmetic plus the few tensor reshapes that belong to a rename (VAE attention 1x1 conv vs
linear, OpenCLIP's fused q/k/v, OpenCLIP's transposed text projection). UNet-local keys carry no
``model.diffusion_model.`` prefix unless a function says otherwise; converters take the prefix as an argument.

The UNet structure of each architecture (levels, which levels carry attention) is fixed, so the maps work key by key
without a full key list: a LoRA's module names can be mapped without opening a checkpoint.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from lib_sdtoolkit.arch.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, base_arch, text_prefixes
from lib_sdtoolkit.arch.layouts import load_layout

__all__ = [
    "UnetStructure",
    "unet_structure",
    "unet_ldm_key_to_diffusers",
    "unet_diffusers_key_to_ldm",
    "unet_ldm_to_diffusers_keys",
    "unet_diffusers_to_ldm_keys",
    "convert_unet_ldm_to_diffusers",
    "convert_unet_diffusers_to_ldm",
    "vae_ldm_key_to_diffusers",
    "vae_diffusers_key_to_ldm",
    "convert_vae_ldm_to_diffusers",
    "convert_vae_diffusers_to_ldm",
    "openclip_from_hf",
    "hf_from_openclip",
    "hf_clip_key_to_openclip",
    "LoraTarget",
    "kohya_lora_names",
    "kohya_name_of_module",
    "ldm_module_of_kohya",
    "ema_key_of",
    "load_layout",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "TEXT_PREFIXES",
]

#: where each text encoder lives in a checkpoint, and in which layout ("hf" = transformers CLIP, "openclip"):
#: arch -> [(component, prefix, layout)], derived from the one table in :mod:`lib_sdtoolkit.arch.families`
TEXT_PREFIXES: Dict[str, List[Tuple[str, str, str]]] = {a: text_prefixes(a) for a in FAMILIES}


# ----------------------------------------------------------------------------------------------------------- UNet

@dataclass(frozen=True)
class UnetStructure:
    """The block structure shared by the ldm/sgm UNet and diffusers' UNet2DConditionModel.

    ``levels``: resolution levels; ``num_res_blocks``: ResBlocks per down level (up levels have one more);
    ``down_attention`` / ``up_attention``: level indexes (diffusers numbering, up levels counted from the lowest
    resolution) whose blocks carry a transformer.
    """

    levels: int
    num_res_blocks: int
    down_attention: Tuple[int, ...]
    up_attention: Tuple[int, ...]
    mid_attention: bool = True

    @property
    def num_input_blocks(self) -> int:
        return 1 + self.levels * (self.num_res_blocks + 1) - 1

    @property
    def num_output_blocks(self) -> int:
        return self.levels * (self.num_res_blocks + 1)


_STRUCTURES = {
    "SD1": UnetStructure(4, 2, (0, 1, 2), (1, 2, 3)),
    "SD2": UnetStructure(4, 2, (0, 1, 2), (1, 2, 3)),
    "SDXL": UnetStructure(3, 2, (1, 2), (0, 1)),
    "SDXL-refiner": UnetStructure(4, 2, (1, 2), (1, 2)),
}


def _base_arch(arch: str) -> str:
    # variants ("SD1-inpainting") and ControlNet use their base UNet's structure
    try:
        return base_arch(arch)
    except ValueError as e:
        raise KeyError(str(e)) from None


def unet_structure(arch: str) -> UnetStructure:
    """The UNet block structure of ``arch`` ("SD1", "SD2", "SDXL", "SDXL-refiner")."""
    try:
        return _STRUCTURES[_base_arch(arch)]
    except KeyError:
        raise ValueError(f"no UNet structure for architecture {arch!r}") from None


_RESNET_LDM_TO_DIFF = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFF_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFF.items()}

_TOP_LDM_TO_DIFF = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_DIFF_TO_LDM = {v: k for k, v in _TOP_LDM_TO_DIFF.items()}


def _rename_head(rest: str, table: Mapping[str, str]) -> Optional[str]:
    """Rename the leading path of ``rest`` ("in_layers.0.weight") by ``table``; None if nothing matches."""
    for src, dst in table.items():
        if rest == src:
            return dst
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def _split(key: str, n: int) -> Tuple[List[str], str]:
    parts = key.split(".", n)
    if len(parts) <= n:
        return parts, ""
    return parts[:n], parts[n]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p != "")


def unet_ldm_key_to_diffusers(key: str, arch: str) -> str:
    """Map one UNet-local ldm/sgm name (``input_blocks.1.0.in_layers.0.weight``, or a module path without the
    parameter suffix) to diffusers' name (``down_blocks.0.resnets.0.norm1.weight``). Raises KeyError if unknown.

    Transformer internals (``transformer_blocks.N.attn1.to_q``, ``proj_in``, ``norm`` ...) share their names.
    """
    s = unet_structure(arch)
    top = _rename_head(key, _TOP_LDM_TO_DIFF)
    if top is not None:
        return top
    nrb = s.num_res_blocks
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", key)
    if m:
        n, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        if n == 0 or n >= s.num_input_blocks:
            raise KeyError(key)
        level, j = divmod(n - 1, nrb + 1)
        if j == nrb:  # downsampler: input_blocks.N.0.op
            if layer != 0 or level >= s.levels - 1:
                raise KeyError(key)
            r = _rename_head(rest, {"op": "conv"})
            if r is None:
                raise KeyError(key)
            return _join(f"down_blocks.{level}.downsamplers.0", r)
        if layer == 0:
            r = _rename_head(rest, _RESNET_LDM_TO_DIFF) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"down_blocks.{level}.resnets.{j}", r)
        if layer == 1 and level in s.down_attention:
            return _join(f"down_blocks.{level}.attentions.{j}", rest)
        raise KeyError(key)
    m = re.match(r"^middle_block\.(\d+)(?:\.(.*))?$", key)
    if m:
        layer, rest = int(m.group(1)), m.group(2) or ""
        if layer in (0, 2):
            r = _rename_head(rest, _RESNET_LDM_TO_DIFF) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"mid_block.resnets.{layer // 2}", r)
        if layer == 1 and s.mid_attention:
            return _join("mid_block.attentions.0", rest)
        raise KeyError(key)
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", key)
    if m:
        n, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        if n >= s.num_output_blocks:
            raise KeyError(key)
        level, j = divmod(n, nrb + 1)
        has_attn = level in s.up_attention
        if layer == 0:
            r = _rename_head(rest, _RESNET_LDM_TO_DIFF) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"up_blocks.{level}.resnets.{j}", r)
        if layer == 1 and has_attn:
            return _join(f"up_blocks.{level}.attentions.{j}", rest)
        if layer == 1 + int(has_attn) and j == nrb and level < s.levels - 1:
            return _join(f"up_blocks.{level}.upsamplers.0", rest)
        raise KeyError(key)
    raise KeyError(key)


def unet_diffusers_key_to_ldm(key: str, arch: str) -> str:
    """Inverse of :func:`unet_ldm_key_to_diffusers` (diffusers UNet-local name -> ldm/sgm UNet-local name)."""
    s = unet_structure(arch)
    top = _rename_head(key, _TOP_DIFF_TO_LDM)
    if top is not None:
        return top
    nrb = s.num_res_blocks
    m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
        if level >= s.levels:
            raise KeyError(key)
        if kind == "downsamplers":
            if j != 0 or level >= s.levels - 1:
                raise KeyError(key)
            r = _rename_head(rest, {"conv": "op"}) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"input_blocks.{1 + level * (nrb + 1) + nrb}.0", r)
        if j >= nrb:
            raise KeyError(key)
        n = 1 + level * (nrb + 1) + j
        if kind == "resnets":
            r = _rename_head(rest, _RESNET_DIFF_TO_LDM) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"input_blocks.{n}.0", r)
        if level not in s.down_attention:
            raise KeyError(key)
        return _join(f"input_blocks.{n}.1", rest)
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if kind == "resnets" and j in (0, 1):
            r = _rename_head(rest, _RESNET_DIFF_TO_LDM) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"middle_block.{2 * j}", r)
        if kind == "attentions" and j == 0 and s.mid_attention:
            return _join("middle_block.1", rest)
        raise KeyError(key)
    m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
        if level >= s.levels:
            raise KeyError(key)
        has_attn = level in s.up_attention
        if kind == "upsamplers":
            if j != 0 or level >= s.levels - 1:
                raise KeyError(key)
            return _join(f"output_blocks.{level * (nrb + 1) + nrb}.{1 + int(has_attn)}", rest)
        if j > nrb:
            raise KeyError(key)
        n = level * (nrb + 1) + j
        if kind == "resnets":
            r = _rename_head(rest, _RESNET_DIFF_TO_LDM) if rest else ""
            if r is None:
                raise KeyError(key)
            return _join(f"output_blocks.{n}.0", r)
        if not has_attn:
            raise KeyError(key)
        return _join(f"output_blocks.{n}.1", rest)
    raise KeyError(key)


def unet_ldm_to_diffusers_keys(keys: Iterable[str], arch: str, prefix: str = "") -> Dict[str, str]:
    """``{ldm_key: diffusers_key}`` for every UNet key in ``keys`` that starts with ``prefix`` (e.g.
    ``"model.diffusion_model."``); other keys are skipped. Raises KeyError for a UNet key of unknown structure."""
    out = {}
    for k in keys:
        if prefix and not k.startswith(prefix):
            continue
        out[k] = unet_ldm_key_to_diffusers(k[len(prefix):], arch)
    return out


def unet_diffusers_to_ldm_keys(keys: Iterable[str], arch: str, prefix: str = "") -> Dict[str, str]:
    """``{diffusers_key: ldm_key}``; the ldm names get ``prefix`` prepended."""
    return {k: prefix + unet_diffusers_key_to_ldm(k, arch) for k in keys}


def convert_unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], arch: str,
                                  prefix: str = UNET_PREFIX) -> Dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict from the UNet keys (under ``prefix``) of an ldm/sgm state dict.
    No reshapes are needed: the two UNets hold the same tensors (SD1 1x1-conv proj_in/out on both sides)."""
    return {d: sd[l] for l, d in unet_ldm_to_diffusers_keys(sd.keys(), arch, prefix).items()}


def convert_unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], arch: str,
                                  prefix: str = UNET_PREFIX) -> Dict[str, torch.Tensor]:
    """An ldm/sgm UNet state dict (names prefixed with ``prefix``; pass ``""`` for a bare UNetModel) from a diffusers
    UNet2DConditionModel state dict."""
    return {l: sd[d] for d, l in unet_diffusers_to_ldm_keys(sd.keys(), arch, prefix).items()}


# ------------------------------------------------------------------------------------------------------------ VAE

_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN_LDM_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_DIFF_TO_LDM = {v: k for k, v in _VAE_ATTN_LDM_TO_DIFF.items()}
_VAE_LEVELS = 4


def vae_ldm_key_to_diffusers(key: str, levels: int = _VAE_LEVELS) -> str:
    """Map a bare ldm VAE name (``decoder.up.3.block.0.nin_shortcut.weight``) to diffusers AutoencoderKL's
    (``decoder.up_blocks.0.resnets.0.conv_shortcut.weight``). ldm numbers decoder levels from the lowest resolution
    up, diffusers from the top: ``up.i`` <-> ``up_blocks.{levels-1-i}``."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        raise KeyError(key)
    part, rest = m.group(1), m.group(2)
    for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out")):
        if rest.startswith(a + "."):
            return f"{part}.{b}{rest[len(a):]}"
    m = re.match(r"^mid\.block_(\d)\.(.*)$", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{_rename_head(m.group(2), _VAE_RESNET) or m.group(2)}"
    m = re.match(r"^mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_VAE_ATTN_LDM_TO_DIFF[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^(down|up)\.(\d+)\.(block|downsample|upsample)(?:\.(\d+))?\.(.*)$", rest)
    if m:
        kind, lvl, what, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if kind == "up":
            lvl = levels - 1 - lvl
        blocks = f"{part}.{kind}_blocks.{lvl}"
        if what == "block":
            return f"{blocks}.resnets.{j}.{_rename_head(tail, _VAE_RESNET) or tail}"
        if j is None:
            return f"{blocks}.{what}rs.0.{tail}"
    raise KeyError(key)


def vae_diffusers_key_to_ldm(key: str, levels: int = _VAE_LEVELS) -> str:
    """Inverse of :func:`vae_ldm_key_to_diffusers`."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        raise KeyError(key)
    part, rest = m.group(1), m.group(2)
    for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
        if rest.startswith(a + "."):
            return f"{part}.{b}{rest[len(a):]}"
    m = re.match(r"^mid_block\.resnets\.(\d)\.(.*)$", rest)
    if m:
        tail = _rename_head(m.group(2), {"conv_shortcut": "nin_shortcut"}) or m.group(2)
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{tail}"
    m = re.match(r"^mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$", rest)
    if m:
        return f"{part}.mid.attn_1.{_VAE_ATTN_DIFF_TO_LDM[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", rest)
    if m:
        kind, lvl, what, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if kind == "up":
            lvl = levels - 1 - lvl
        if what == "resnets":
            tail = _rename_head(tail, {"conv_shortcut": "nin_shortcut"}) or tail
            return f"{part}.{kind}.{lvl}.block.{j}.{tail}"
        return f"{part}.{kind}.{lvl}.{what[:-2]}.{tail}"
    raise KeyError(key)


def _is_vae_attn_weight(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def convert_vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict from an ldm VAE state dict (keys under ``prefix``, e.g.
    ``"first_stage_model."`` for a checkpoint, ``""`` for a bare VAE file). The mid-block attention's 1x1 conv
    weights ``[C, C, 1, 1]`` become linear weights ``[C, C]``. Keys outside the VAE are skipped."""
    out = {}
    for k, v in sd.items():
        if prefix and not k.startswith(prefix):
            continue
        local = k[len(prefix):]
        if not local.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            continue
        if _is_vae_attn_weight(local) and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[vae_ldm_key_to_diffusers(local)] = v
    return out


def convert_vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """ldm VAE state dict (names prefixed with ``prefix``) from a diffusers AutoencoderKL state dict; linear
    attention weights become 1x1 conv weights."""
    out = {}
    for k, v in sd.items():
        local = vae_diffusers_key_to_ldm(k)
        if _is_vae_attn_weight(local) and v.ndim == 2:
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[prefix + local] = v
    return out


# ------------------------------------------------------------------------------------------------ CLIP / OpenCLIP

_HF_LAYER_TO_OC = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OC_LAYER_TO_HF = {v: k for k, v in _HF_LAYER_TO_OC.items()}


def hf_clip_key_to_openclip(key: str) -> Tuple[str, Optional[int]]:
    """The OpenCLIP name holding HF CLIP parameter ``key`` and, for q/k/v projections, which third (0, 1, 2) of the
    fused ``attn.in_proj_weight`` / ``in_proj_bias`` it is (None otherwise). Module paths (no ``.weight``) work too
    (``text_model.encoder.layers.3.self_attn.q_proj`` -> (``transformer.resblocks.3.attn.in_proj``, 0)).
    ``text_projection`` is stored transposed in OpenCLIP."""
    fixed = {
        "text_model.embeddings.token_embedding": "token_embedding",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm": "ln_final",
        "text_projection.weight": "text_projection",
        "text_projection": "text_projection",
    }
    r = _rename_head(key, fixed)
    if r is not None:
        return r, None
    m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$", key)
    if m:
        n, rest = m.group(1), m.group(2)
        q = re.match(r"^self_attn\.(q|k|v)_proj(?:\.(weight|bias))?$", rest)
        if q:
            suffix = f"_{q.group(2)}" if q.group(2) else ""
            return f"transformer.resblocks.{n}.attn.in_proj{suffix}", "qkv".index(q.group(1))
        r = _rename_head(rest, _HF_LAYER_TO_OC)
        if r is not None:
            return f"transformer.resblocks.{n}.{r}", None
    raise KeyError(key)


def openclip_from_hf(sd: Mapping[str, torch.Tensor], logit_scale: Optional[torch.Tensor] = None
                     ) -> Dict[str, torch.Tensor]:
    """OpenCLIP text-tower state dict (``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.N.attn.in_proj_weight`` ..., ``ln_final``, ``text_projection``) from a transformers
    ``CLIPTextModel(WithProjection)`` state dict. q/k/v are concatenated into ``in_proj``; ``text_projection.weight``
    ``[proj, width]`` becomes ``text_projection`` ``[width, proj]``; ``position_ids`` is dropped (OpenCLIP has none).
    ``logit_scale`` (a scalar, not part of a text model) is added when given."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, List[Optional[torch.Tensor]]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        name, part = hf_clip_key_to_openclip(k)
        if part is None:
            out[name] = v.t().contiguous() if name == "text_projection" else v
        else:
            qkv.setdefault(name, [None, None, None])[part] = v
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise KeyError(f"{name}: q/k/v projections incomplete")
        out[name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if logit_scale is not None:
        out["logit_scale"] = logit_scale
    return out


def hf_from_openclip(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_from_hf`: split ``in_proj`` into q/k/v, transpose ``text_projection``; drops
    ``logit_scale`` and ``attn_mask``. The result loads into ``CLIPTextModelWithProjection``."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("logit_scale", "attn_mask"):
            continue
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        else:
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", k)
            if not m:
                raise KeyError(k)
            n, rest = m.group(1), m.group(2)
            base = f"text_model.encoder.layers.{n}."
            q = re.match(r"^attn\.in_proj_(weight|bias)$", rest)
            if q:
                for name, t in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{q.group(1)}"] = t.contiguous()
                continue
            r = _rename_head(rest, _OC_LAYER_TO_HF)
            if r is None:
                raise KeyError(k)
            out[base + r] = v
    return out


# ---------------------------------------------------------------------------------------------------- kohya LoRA

@dataclass(frozen=True)
class LoraTarget:
    """Where a kohya LoRA module lands in an ldm/sgm checkpoint.

    ``module``: full checkpoint module name (``model.diffusion_model.input_blocks.1.1.proj_in``); its parameter is
    ``module + ".weight"``. ``qkv_index``: for OpenCLIP text encoders, 0/1/2 = q/k/v rows of the fused
    ``module + "_weight"`` (``...attn.in_proj_weight``), each ``width`` rows; None otherwise.
    ``component``: "unet", "text_encoder" or "text_encoder_2".
    """

    module: str
    component: str
    qkv_index: Optional[int] = None
    #: Flux: rows ``(first, count)`` of a fused weight, in units of its input width (``qkv``: q = (0, 1);
    #: ``linear1``: mlp = (3, 4)); None = the whole weight (see :mod:`lib_sdtoolkit.arch.fluxmaps`)
    rows: Optional[Tuple[int, int]] = None
    #: Flux: the file's ΔW has the two halves of its rows swapped against the target (diffusers ``norm_out``)
    swap: bool = False
    #: the parameter of ``module`` the layer changes: ``weight``, or ``scale`` for BFL's qk-norms (RMSNorm)
    param: str = "weight"

    @property
    def weight_key(self) -> str:
        return self.module + ("_weight" if self.qkv_index is not None else "." + self.param)

    def row_slice(self, shape: Tuple[int, ...]) -> Optional[slice]:
        """The rows of a target weight of ``shape`` this module patches (an offset into a fused weight, as
        ComfyUI's model_patcher keeps one); None = all of them."""
        if self.qkv_index is not None:
            n = int(shape[0]) // 3
            return slice(self.qkv_index * n, (self.qkv_index + 1) * n)
        if self.rows is not None:
            u = int(shape[1])
            return slice(self.rows[0] * u, (self.rows[0] + self.rows[1]) * u)
        return None


def _module_names(keys: Iterable[str]) -> List[str]:
    """Module paths of the weight matrices a LoRA can target (linear / conv weights, ndim >= 2)."""
    return [k[: -len(".weight")] for k in keys if k.endswith(".weight")]


def _hf_text_modules(layout: Mapping[str, Tuple[int, ...]], prefix: str, fmt: str) -> List[Tuple[str, str, Optional[int]]]:
    """(hf_module_path, ldm_module, qkv_index) for the Linear layers of a text encoder in the layout."""
    out = []
    keys = [k[len(prefix):] for k in layout if k.startswith(prefix)]
    if fmt == "hf":
        for k in keys:
            if k.endswith(".weight") and len(layout[prefix + k]) == 2 and ".encoder.layers." in k:
                mod = k[: -len(".weight")]
                out.append((mod, prefix + mod, None))
        return out
    for k in keys:
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", k)
        if not m:
            continue
        n, rest = m.group(1), m.group(2)
        base = f"text_model.encoder.layers.{n}."
        if rest == "attn.in_proj_weight":
            for i, name in enumerate("qkv"):
                out.append((f"{base}self_attn.{name}_proj", f"{prefix}transformer.resblocks.{n}.attn.in_proj", i))
        elif rest.endswith(".weight") and len(layout[prefix + k]) == 2:
            mod = rest[: -len(".weight")]
            hf = _rename_head(mod, _OC_LAYER_TO_HF)
            if hf is not None:
                out.append((base + hf, f"{prefix}transformer.resblocks.{n}.{mod}", None))
    return out


@functools.lru_cache(maxsize=None)
def kohya_lora_names(arch: str) -> Dict[str, LoraTarget]:
    """Every kohya LoRA module name of ``arch`` -> its :class:`LoraTarget`, built from the shipped full layout.

    UNet: SD1/SD2 use diffusers paths (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``);
    SDXL / SDXL-refiner use sgm paths as sd-scripts writes them (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
    and the diffusers-path spelling is accepted too. Text encoders use HF CLIP paths (``lora_te_text_model_encoder_
    layers_0_self_attn_q_proj``), mapped onto OpenCLIP's fused in_proj where the checkpoint is OpenCLIP.
    Targets are the modules with a >=2-D weight (Linear, Conv)."""
    base = _base_arch(arch)
    layout = load_layout(base)
    table: Dict[str, LoraTarget] = {}
    unet_keys = [k[len(UNET_PREFIX):] for k in layout if k.startswith(UNET_PREFIX) and len(layout[k]) >= 2]
    for mod in _module_names(unet_keys):
        target = LoraTarget(UNET_PREFIX + mod, "unet")
        diff = unet_ldm_key_to_diffusers(mod, base)
        table["lora_unet_" + diff.replace(".", "_")] = target
        if base.startswith("SDXL"):
            table["lora_unet_" + mod.replace(".", "_")] = target
    for comp, prefix, fmt in TEXT_PREFIXES.get(base, []):
        te = FAMILIES[base].text_encoder(comp).kohya
        for hf_mod, ldm_mod, idx in _hf_text_modules(layout, prefix, fmt):
            table[te + hf_mod.replace(".", "_")] = LoraTarget(ldm_mod, comp, idx)
    return table


def kohya_name_of_module(module: str, arch: str) -> str:
    """The kohya LoRA name for a checkpoint module (``model.diffusion_model.input_blocks.1.1.proj_in`` ->
    ``lora_unet_down_blocks_0_attentions_0_proj_in`` for SD1; sgm spelling for SDXL). For an OpenCLIP fused in_proj
    pass ``module`` + ``"#q"``/``"#k"``/``"#v"``. Raises KeyError if the module is no LoRA target."""
    base = _base_arch(arch)
    idx = None
    if "#" in module:
        module, part = module.split("#", 1)
        idx = "qkv".index(part)
    if module.startswith(UNET_PREFIX):
        local = module[len(UNET_PREFIX):]
        if base.startswith("SDXL"):
            unet_ldm_key_to_diffusers(local, base)  # validates
            return "lora_unet_" + local.replace(".", "_")
        return "lora_unet_" + unet_ldm_key_to_diffusers(local, base).replace(".", "_")
    for name, t in kohya_lora_names(base).items():
        if t.module == module and t.qkv_index == idx and not name.startswith("lora_unet_"):
            return name
    raise KeyError(module)


def ldm_module_of_kohya(name: str, arch: str) -> LoraTarget:
    """The checkpoint module a kohya LoRA name targets (see :func:`kohya_lora_names`). Raises KeyError."""
    return kohya_lora_names(_base_arch(arch))[name]


def ema_key_of(key: str) -> str:
    """The EMA copy's name in SD1-era checkpoints: ``model.diffusion_model.input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight`` (``model.`` dropped, remaining dots removed)."""
    if not key.startswith("model."):
        raise KeyError(key)
    return "model_ema." + key[len("model."):].replace(".", "")
