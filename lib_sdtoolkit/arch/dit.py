"""Recognition of the transformer families (Flux.1, SD3/SD3.5) and of the separate files they ship as (16-channel
VAE, CLIP, T5 encoders), by key names and structure only.

Rules (each one names keys a layout cannot lack; a file that has only some of them is *not* that layout):

* **Flux.1, BFL names** (``flux1-dev.safetensors``; also under ``model.diffusion_model.`` in the all-in-one files
  ComfyUI and Forge write): ``img_in``, ``txt_in``, ``time_in.in_layer``, ``vector_in.in_layer``,
  ``double_blocks.0.img_mod.lin``, ``double_blocks.0.txt_attn.qkv``, ``single_blocks.0.linear1``,
  ``single_blocks.0.modulation.lin``, ``final_layer.linear`` (all ``.weight``), found under one common prefix.
  ``dev`` has ``guidance_in`` (the distilled-guidance embedder), ``schnell`` has not.
  Flux.2 (no ``vector_in``, shared ``double_stream_modulation_*``) and Chroma (no ``vector_in``) miss keys here
  and stay unknown.
* **Flux.1, diffusers names** (``FluxTransformer2DModel``): ``x_embedder``, ``context_embedder``,
  ``time_text_embed.timestep_embedder.linear_1``, ``time_text_embed.text_embedder.linear_1``,
  ``transformer_blocks.0.norm1_context.linear``, ``single_transformer_blocks.0.proj_mlp``, ``proj_out``;
  ``dev`` has ``time_text_embed.guidance_embedder``.
* **all-in-one**: the BFL transformer under ``model.diffusion_model.`` plus at least one of the VAE
  (``vae.`` or ``first_stage_model.``), ``text_encoders.clip_l.``, ``text_encoders.t5xxl.``.
* **SD3 / SD3.5**: ``joint_blocks.0.x_block.attn.qkv`` + ``joint_blocks.0.context_block.attn.qkv`` +
  ``x_embedder.proj`` + ``t_embedder.mlp.0`` (SAI/ComfyUI names), or diffusers' ``pos_embed.proj`` +
  ``transformer_blocks.0.attn.add_q_proj`` without ``single_transformer_blocks``. 24 joint blocks with
  ``x_block.attn2`` is 3.5 medium (MMDiT-X), 24 without is 3 medium, 38 is 3.5 large. Not mergeable yet.
* **separate text encoders**: HF CLIP text model (``text_model.embeddings.token_embedding`` +
  ``text_model.encoder.layers.0.self_attn.q_proj``): 12 layers CLIP-L, 32 layers CLIP-G; T5 encoder
  (``encoder.block.0.layer.0.SelfAttention.q`` + ``encoder.final_layer_norm``), named T5-XXL when its width is
  4096 with 24 blocks (the only one of these facts widths decide, and only for the name).

Nothing here looks at absolute widths to decide *what* a file is, so tiny test files are recognised as full ones.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import fluxmaps

#: top-level names of each transformer layout (the bare-key roots of its component)
FLUX_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                  "guidance_in.", "final_layer.")
FLUX_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                        "time_text_embed.", "norm_out.", "proj_out.")
SD3_ROOTS = ("joint_blocks.", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "pos_embed",
             "final_layer.")
SD3_DIFFUSERS_ROOTS = ("transformer_blocks.", "pos_embed.", "time_text_embed.", "context_embedder.", "norm_out.",
                       "proj_out.")
CLIP_ROOTS = ("text_model.", "text_projection", "logit_scale")
T5_ROOTS = ("encoder.", "shared.")

_FLUX_BFL_REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                      "double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_attn.qkv.weight",
                      "single_blocks.0.linear1.weight", "single_blocks.0.modulation.lin.weight",
                      "final_layer.linear.weight")
_FLUX_DIFFUSERS_REQUIRED = ("x_embedder.weight", "context_embedder.weight",
                            "time_text_embed.timestep_embedder.linear_1.weight",
                            "time_text_embed.text_embedder.linear_1.weight",
                            "transformer_blocks.0.norm1_context.linear.weight",
                            "single_transformer_blocks.0.proj_mlp.weight", "proj_out.weight")
_SD3_REQUIRED = ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight",
                 "x_embedder.proj.weight", "t_embedder.mlp.0.weight")
_SD3_DIFFUSERS_REQUIRED = ("pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                           "context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight")
_CLIP_REQUIRED = ("text_model.embeddings.token_embedding.weight",
                  "text_model.encoder.layers.0.self_attn.q_proj.weight")
_T5_REQUIRED = ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight")

#: prefixes of the other components inside a Flux / SD3 all-in-one checkpoint (first match wins)
_VAE_PREFIXES = ("vae.", "first_stage_model.")
_TE_PREFIXES = {"Flux.1": (("text_encoder", "text_encoders.clip_l."), ("text_encoder_2", "text_encoders.t5xxl.")),
                "SD3": (("text_encoder", "text_encoders.clip_l."), ("text_encoder_2", "text_encoders.clip_g."),
                        ("text_encoder_3", "text_encoders.t5xxl."))}
#: Flux.1's released depths (19 double + 38 single blocks)
FLUX_DEPTHS = (19, 38)


def _shape(v: Any) -> Tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _prefixes_with(keys: Sequence[str], anchor: str) -> List[str]:
    """Every prefix ``p`` such that ``p + anchor`` is a key (``p`` empty or ending in ``.``)."""
    out = []
    for k in keys:
        if k.endswith(anchor):
            p = k[: len(k) - len(anchor)]
            if p == "" or p.endswith("."):
                out.append(p)
    return sorted(set(out), key=len)


def _find_prefix(keyset: Mapping[str, Any], keys: Sequence[str], required: Sequence[str]) -> Optional[str]:
    for p in _prefixes_with(keys, required[0]):
        if all(p + r in keyset for r in required):
            return p
    return None


def _count(keys: Iterable[str], prefix: str, block: str) -> int:
    pat = re.compile(re.escape(prefix + block) + r"\.(\d+)\.")
    best = -1
    for k in keys:
        m = pat.match(k)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def _other_components(keyset: Mapping[str, Any], keys: Sequence[str], arch: str, transformer: str
                      ) -> Dict[str, str]:
    """The VAE and text encoders an all-in-one file holds beside its transformer (``{component: prefix}``)."""
    out: Dict[str, str] = {}
    for vp in _VAE_PREFIXES:
        if vp != transformer and (vp + "decoder.conv_in.weight" in keyset or vp + "encoder.conv_in.weight" in keyset):
            out["vae"] = vp
            break
    for comp, tp in _TE_PREFIXES.get(arch, ()):
        if any(k.startswith(tp) for k in keys):
            out[comp] = tp
    return out


def detect_dit(shapes: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """``{"architecture", "variant", "layout", "prefixes", "roots", "notes"}`` for Flux.1 / SD3 transformers and
    the separate text-encoder files, or None when the keys are none of these."""
    keys = list(shapes)
    notes: List[str] = []

    # ---- Flux.1, BFL names (bare, diffusion_model., model.diffusion_model.)
    p = _find_prefix(shapes, keys, _FLUX_BFL_REQUIRED)
    if p is not None:
        variant = "dev" if p + "guidance_in.in_layer.weight" in shapes else "schnell"
        n_double, n_single = _count(keys, p, "double_blocks"), _count(keys, p, "single_blocks")
        if (n_double, n_single) != FLUX_DEPTHS:
            notes.append(f"{n_double} double and {n_single} single blocks (Flux.1 releases have "
                         f"{FLUX_DEPTHS[0]} and {FLUX_DEPTHS[1]}): a pruned or distilled Flux")
        cin = _shape(shapes[p + "img_in.weight"])[-1]
        if cin != fluxmaps.LATENT_CHANNELS:  # Fill/Canny/Depth concatenate conditioning to the packed latent
            notes.append(f"img_in takes {cin} input channels, not 64: a Fill/Canny/Depth-style Flux with extra "
                         f"conditioning channels")
        others = _other_components(shapes, keys, "Flux.1", p)
        prefixes = {"transformer": p, **others}
        layout = "all-in-one" if others else "bfl"
        roots = {"transformer": FLUX_BFL_ROOTS} if p == "" else {}
        if p and not others:
            notes.append(f"transformer only, keys under {p!r}")
        return dict(architecture="Flux.1", variant=variant, layout=layout, prefixes=prefixes, roots=roots,
                    notes=notes)

    # ---- Flux.1, diffusers names (bare or under transformer.)
    p = _find_prefix(shapes, keys, _FLUX_DIFFUSERS_REQUIRED)
    if p is not None:
        variant = "dev" if p + "time_text_embed.guidance_embedder.linear_1.weight" in shapes else "schnell"
        n_double, n_single = _count(keys, p, "transformer_blocks"), _count(keys, p, "single_transformer_blocks")
        if (n_double, n_single) != FLUX_DEPTHS:
            notes.append(f"{n_double} double and {n_single} single blocks (Flux.1 releases have "
                         f"{FLUX_DEPTHS[0]} and {FLUX_DEPTHS[1]}): a pruned or distilled Flux")
        return dict(architecture="Flux.1", variant=variant, layout="diffusers", prefixes={"transformer": p},
                    roots={"transformer": FLUX_DIFFUSERS_ROOTS} if p == "" else {}, notes=notes)

    # ---- SD3 / SD3.5 (recognised so that it is named; no tool merges it yet)
    p = _find_prefix(shapes, keys, _SD3_REQUIRED)
    diffusers = False
    if p is None:
        p = _find_prefix(shapes, keys, _SD3_DIFFUSERS_REQUIRED)
        if p is not None and any(k.startswith(p + "single_transformer_blocks.") for k in keys):
            p = None
        diffusers = p is not None
    if p is not None:
        block = "transformer_blocks" if diffusers else "joint_blocks"
        n = _count(keys, p, block)
        x2 = any(k.startswith(p + block + ".0.") and (".attn2." in k) for k in keys)
        variant = {38: "3.5-large"}.get(n) or ({24: "3.5-medium"}.get(n) if x2 else {24: "3-medium"}.get(n))
        if variant is None:
            notes.append(f"{n} joint blocks (SD3 medium has 24, SD3.5 large 38)")
        notes.append("SD3/SD3.5 is recognised but not supported for merge yet")
        others = {} if diffusers else _other_components(shapes, keys, "SD3", p)
        layout = "diffusers" if diffusers else ("all-in-one" if others else "bfl")
        roots = {"transformer": SD3_DIFFUSERS_ROOTS if diffusers else SD3_ROOTS} if p == "" else {}
        return dict(architecture="SD3", variant=variant, layout=layout, prefixes={"transformer": p, **others},
                    roots=roots, notes=notes)

    # ---- separate text encoders (the files Flux / SD3 users keep beside the transformer)
    if all(r in shapes for r in _CLIP_REQUIRED):
        n = _count(keys, "", "text_model.encoder.layers")
        arch = {12: "CLIP-L", 32: "CLIP-G"}.get(n, "CLIP")
        if arch == "CLIP":
            notes.append(f"a CLIP text encoder with {n} layers (CLIP-L has 12, CLIP-G 32)")
        return dict(architecture=arch, variant=None, layout="component", prefixes={"text_encoder": ""},
                    roots={"text_encoder": CLIP_ROOTS}, notes=notes)
    if all(r in shapes for r in _T5_REQUIRED):
        n = _count(keys, "", "encoder.block")
        width = _shape(shapes[_T5_REQUIRED[1]])[0]
        variant = "XXL" if (n, width) == (24, 4096) else None
        notes.append(f"T5 encoder, {n} blocks, width {width}" + (" (T5-XXL, as Flux and SD3 use)" if variant else ""))
        return dict(architecture="T5", variant=variant, layout="component", prefixes={"text_encoder": ""},
                    roots={"text_encoder": T5_ROOTS}, notes=notes)
    return None


def vae_variant(shapes: Mapping[str, Any], prefix: str) -> Optional[str]:
    """``"16-channel"`` for the Flux / SD3 VAE (``ae.safetensors``): its decoder takes a 16-channel latent."""
    w = shapes.get(prefix + "decoder.conv_in.weight")
    if w is not None and len(_shape(w)) == 4 and _shape(w)[1] == 16:
        return "16-channel"
    return None


__all__ = ["detect_dit", "vae_variant", "FLUX_BFL_ROOTS", "FLUX_DIFFUSERS_ROOTS", "SD3_ROOTS", "CLIP_ROOTS",
           "T5_ROOTS", "FLUX_DEPTHS"]
