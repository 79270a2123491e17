"""Flux.1 sample files with the key names of released ones, at tiny width (or full width on ``meta``).

* BFL layout (``flux1-dev.safetensors``): names and shapes follow BFL's ``Flux`` module (``img_in``, ``time_in``,
  ``vector_in``, ``guidance_in`` (dev only), ``txt_in``, 19 ``double_blocks``, 38 ``single_blocks``,
  ``final_layer``); :func:`bfl_specs` is checked against sd-mecha's shipped ``flux-flux.yaml`` at full width and
  against diffusers' own converter into ``FluxTransformer2DModel`` (tests/test_flux_arch.py).
* diffusers layout: ``diffusers.FluxTransformer2DModel``'s own ``state_dict()`` at tiny width.
* the separate files: the 16-channel VAE (``ae.safetensors``: ldm ``Encoder``/``Decoder`` with 16 latent
  channels and no quant convs, bare keys), CLIP-L (transformers ``CLIPTextModel``, 12 layers, ``text_model.*``),
  T5-XXL (transformers ``T5EncoderModel``, 24 blocks, gated GELU; ``encoder.embed_tokens`` is tied to ``shared``
  and not stored).
* all-in-one (ComfyUI / Forge): ``model.diffusion_model.`` + ``vae.`` + ``text_encoders.clip_l.transformer.`` +
  ``text_encoders.t5xxl.transformer.``.

Tiny keeps every key (same depths, same layer counts) and shrinks widths: hidden 32 (2 heads of 16), MLP 4x,
T5/CLIP width 32, the VAE at the SD tiny width. The latent packing (64 = 16 channels x 2 x 2) and the 256-wide
timestep embedding are kept, as they do not depend on the width.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from .factory import _device_ctx, _diffusers, get_config, make_tensor

PathLike = Union[str, "os.PathLike[str]"]
Shape = Tuple[int, ...]

_FLUX = {"full": dict(hidden=3072, heads=24, context=4096, vec=768),
         "tiny": dict(hidden=32, heads=2, context=32, vec=32)}
_CLIP_L = {"full": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, vocab_size=49408),
           "tiny": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=1024)}
_T5 = {"full": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, vocab_size=32128),
       "tiny": dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, vocab_size=128)}
DEPTH, DEPTH_SINGLE = 19, 38
IN_CHANNELS = 64  # 16 latent channels packed 2x2
TIME_DIM = 256
ALL_IN_ONE = {"transformer": "model.diffusion_model.", "vae": "vae.",
              "text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."}


def bfl_specs(width: str = "tiny", variant: str = "dev", depth: int = DEPTH, depth_single: int = DEPTH_SINGLE
              ) -> List[Tuple[str, Shape]]:
    """``[(key, shape)]`` of a Flux.1 transformer in BFL names, in the module's order."""
    c = _FLUX[width]
    h, heads = c["hidden"], c["heads"]
    head_dim = h // heads
    mlp = 4 * h
    out: List[Tuple[str, Shape]] = []

    def lin(name: str, o: int, i: int) -> None:
        out.extend([(f"{name}.weight", (o, i)), (f"{name}.bias", (o,))])

    def emb(name: str, i: int) -> None:
        lin(f"{name}.in_layer", h, i)
        lin(f"{name}.out_layer", h, h)

    lin("img_in", h, IN_CHANNELS)
    emb("time_in", TIME_DIM)
    emb("vector_in", c["vec"])
    if variant == "dev":
        emb("guidance_in", TIME_DIM)
    lin("txt_in", h, c["context"])
    for i in range(depth):
        b = f"double_blocks.{i}"
        for s in ("img", "txt"):
            lin(f"{b}.{s}_mod.lin", 6 * h, h)
            lin(f"{b}.{s}_attn.qkv", 3 * h, h)
            out.extend([(f"{b}.{s}_attn.norm.query_norm.scale", (head_dim,)),
                        (f"{b}.{s}_attn.norm.key_norm.scale", (head_dim,))])
            lin(f"{b}.{s}_attn.proj", h, h)
            lin(f"{b}.{s}_mlp.0", mlp, h)
            lin(f"{b}.{s}_mlp.2", h, mlp)
    for i in range(depth_single):
        b = f"single_blocks.{i}"
        lin(f"{b}.linear1", 3 * h + mlp, h)
        lin(f"{b}.linear2", h, h + mlp)
        out.extend([(f"{b}.norm.query_norm.scale", (head_dim,)), (f"{b}.norm.key_norm.scale", (head_dim,))])
        lin(f"{b}.modulation.lin", 3 * h, h)
    lin("final_layer.linear", IN_CHANNELS, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def build_diffusers_transformer(width: str = "tiny", variant: str = "dev", device: Optional[str] = None
                                ) -> torch.nn.Module:
    """diffusers ``FluxTransformer2DModel`` with Flux.1's depths at ``width`` (default init). diffusers is not
    shipped by A1111: without it, a MissingDependencyError says so (the factory's one guard)."""
    FluxTransformer2DModel = _diffusers().FluxTransformer2DModel

    c = _FLUX[width]
    head_dim = c["hidden"] // c["heads"]
    axes = (16, 56, 56) if head_dim == 128 else (4, 6, 6)
    with _device_ctx(device):
        return FluxTransformer2DModel(patch_size=1, in_channels=IN_CHANNELS, num_layers=DEPTH,
                                      num_single_layers=DEPTH_SINGLE, attention_head_dim=head_dim,
                                      num_attention_heads=c["heads"], joint_attention_dim=c["context"],
                                      pooled_projection_dim=c["vec"], guidance_embeds=variant == "dev",
                                      axes_dims_rope=axes).eval()


def build_vae16(width: str = "tiny", device: Optional[str] = None) -> torch.nn.Module:
    """The Flux / SD3 VAE as BFL's ``ae.safetensors`` holds it: ldm ``Encoder`` + ``Decoder`` with 16 latent
    channels and no quant convs."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    dd = dict(get_config("VAE", width).vae["ddconfig"], z_channels=16)
    with _device_ctx(device):
        m = torch.nn.Module()
        m.encoder = Encoder(**dd)
        m.decoder = Decoder(**dd)
    return m.eval()


def build_clip_l(width: str = "tiny", device: Optional[str] = None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", **_CLIP_L[width])
    with _device_ctx(device):
        return CLIPTextModel(cfg).eval()


def build_t5xxl(width: str = "tiny", device: Optional[str] = None) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(num_layers=24, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **_T5[width])
    with _device_ctx(device):
        return T5EncoderModel(cfg).eval()


def _module_specs(m: torch.nn.Module, skip: Tuple[str, ...] = ()) -> List[Tuple[str, Shape]]:
    return [(k, tuple(v.shape)) for k, v in m.state_dict().items() if k not in skip]


def component_specs(component: str, width: str = "tiny") -> List[Tuple[str, Shape]]:
    """Bare keys of one separate file: ``vae`` (16-channel), ``clip_l``, ``t5xxl`` (built on ``meta``)."""
    if component == "vae":
        return _module_specs(build_vae16(width, "meta"))
    if component == "clip_l":
        return _module_specs(build_clip_l(width, "meta"), skip=("text_model.embeddings.position_ids",))
    if component == "t5xxl":
        return _module_specs(build_t5xxl(width, "meta"), skip=("encoder.embed_tokens.weight",))
    raise ValueError(f"unknown Flux component {component!r} (vae, clip_l, t5xxl)")


def specs(layout: str = "bfl", variant: str = "dev", width: str = "tiny") -> List[Tuple[str, Shape]]:
    """``[(key, shape)]`` of a Flux.1 file: ``bfl``, ``diffusers``, ``all-in-one``, or a component (``vae``,
    ``clip_l``, ``t5xxl``)."""
    if layout == "bfl":
        return bfl_specs(width, variant)
    if layout == "diffusers":
        return _module_specs(build_diffusers_transformer(width, variant, "meta"))
    if layout == "all-in-one":
        out = [(ALL_IN_ONE["transformer"] + k, s) for k, s in bfl_specs(width, variant)]
        out += [(ALL_IN_ONE["vae"] + k, s) for k, s in component_specs("vae", width)]
        out += [(ALL_IN_ONE["text_encoder"] + k, s) for k, s in component_specs("clip_l", width)]
        out += [(ALL_IN_ONE["text_encoder_2"] + k, s) for k, s in component_specs("t5xxl", width)]
        return out
    if layout in ("vae", "clip_l", "t5xxl"):
        return component_specs(layout, width)
    raise ValueError(f"unknown Flux layout {layout!r}")


def state_dict(layout: str = "bfl", variant: str = "dev", width: str = "tiny", seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """Deterministic tensors (:func:`factory.make_tensor`) for :func:`specs` (tiny width only)."""
    if width != "tiny":
        raise ValueError("full-width Flux tensors are never built in memory; use specs() for names and shapes")
    return {k: make_tensor(k, s, seed, dtype) for k, s in specs(layout, variant, width)}


def write(path: PathLike, layout: str = "bfl", variant: str = "dev", *, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16, metadata: Optional[Mapping[str, str]] = None,
          overwrite: bool = False) -> Path:
    """Write a tiny Flux.1 file of ``layout`` (see :func:`specs`) as ``.safetensors`` (fp8 dtypes allowed)."""
    from lib_sdtoolkit.files import save_safetensors

    sd = state_dict(layout, variant, "tiny", seed, torch.float32)
    if dtype != torch.float32:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return save_safetensors(path, sd, dict(metadata) if metadata else None, overwrite=overwrite)


__all__ = ["bfl_specs", "specs", "component_specs", "state_dict", "write", "build_diffusers_transformer",
           "build_vae16", "build_clip_l", "build_t5xxl", "ALL_IN_ONE", "DEPTH", "DEPTH_SINGLE"]
