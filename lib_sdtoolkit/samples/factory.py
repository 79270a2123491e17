"""Model factory: real-architecture Stable Diffusion weights, at tiny or full width, with the exact key names of
real checkpoints.

* SD1.5 / SD2.1: the real ldm ``UNetModel`` and ldm VAE ``Encoder``/``Decoder`` (+ ``quant_conv`` /
  ``post_quant_conv`` as ``AutoencoderKL`` holds them), transformers' ``CLIPTextModel`` (SD1, keys
  ``cond_stage_model.transformer.text_model.*`` + int64 ``position_ids``), OpenCLIP ViT-H (SD2,
  ``cond_stage_model.model.*``) converted from ``CLIPTextModelWithProjection`` by :mod:`lib_sdtoolkit.arch.keymaps`.
* SDXL base / refiner: diffusers ``UNet2DConditionModel`` with SDXL's block structure, renamed to sgm names
  (``model.diffusion_model.input_blocks...``, ``label_emb.0.0``); CLIP-L (HF layout, ``conditioner.embedders.0``)
  and OpenCLIP bigG (``conditioner.embedders.1.model``; refiner: ``conditioner.embedders.0.model``).

"tiny" keeps every key (same depths, same number of layers, same channel ratios) and shrinks widths, so a tiny file
has exactly the keys of the real one. "full" has the real shapes too; it is only ever built on the ``meta`` device
and written by streaming one generated tensor at a time (see :func:`write_checkpoint`).

Weights are deterministic per (seed, key): ``N(0, 0.02)``, 1-D ``.weight`` tensors (norms) ``1 + N(0, 0.02)``,
``position_ids`` ``arange(77)``, ``logit_scale`` ``log(1/0.07)``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from lib_sdtoolkit.arch import keymaps

PathLike = Union[str, "os.PathLike[str]"]
Shape = Tuple[int, ...]

ARCHITECTURES = ("SD1", "SD2", "SDXL", "SDXL-refiner", "VAE")
VARIANTS = {"inpainting": 9, "instruct-pix2pix": 8}
WIDTHS = ("tiny", "full")

_CLIP_L = {"full": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768),
           "tiny": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)}
_CLIP_H = {"full": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, projection_dim=1024),
           "tiny": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)}
_CLIP_G = {"full": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280),
           "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=64)}
_UNET_CH = {"full": 320, "tiny": 32}
_SDXL_CH = {"full": (320, 640, 1280), "tiny": (16, 32, 48)}
_REFINER_CH = {"full": (384, 768, 1536, 1536), "tiny": (16, 32, 48, 48)}
# SDXL UNets exist only as diffusers modules here (no ldm class), so tiny ones may use 16 GroupNorm groups
_SDXL_GROUPS = {"full": 32, "tiny": 16}
_SDXL_HEAD_DIM = {"full": 64, "tiny": 8}
_TIME_EMB = {"full": 256, "tiny": 8}
_VAE_CH = {"full": 128, "tiny": 32}
# channel multipliers: tiny keeps a channel change wherever the real model has one (so the same shortcut convs
# exist) but grows slower; every width stays a multiple of 32 (ldm's GroupNorm has 32 groups)
_MULT = {"full": (1, 2, 4, 4), "tiny": (1, 2, 3, 3)}
_VOCAB = {"full": 49408, "tiny": 1024}


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a checkpoint: its component name, key prefix in the file, layout ("hf" or "openclip"),
    transformers ``CLIPTextConfig`` kwargs, and whether it has a text projection (``CLIPTextModelWithProjection``)."""

    component: str
    prefix: str
    layout: str
    config: Mapping[str, Any]
    with_projection: bool


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to build one architecture at one width.

    ``ldm_unet``: kwargs of ldm ``UNetModel`` (SD1/SD2 only); ``diffusers_unet``: kwargs of diffusers
    ``UNet2DConditionModel`` (all); ``vae``: ``{"ddconfig": ..., "embed_dim": 4}`` for the ldm VAE;
    ``diffusers_vae``: kwargs of diffusers ``AutoencoderKL``; ``text_encoders``: :class:`TextEncoderSpec` list.
    """

    arch: str
    width: str
    variant: Optional[str]
    ldm_unet: Optional[Mapping[str, Any]]
    diffusers_unet: Optional[Mapping[str, Any]]
    vae: Mapping[str, Any]
    diffusers_vae: Mapping[str, Any]
    text_encoders: Tuple[TextEncoderSpec, ...] = field(default_factory=tuple)


def _check(arch: str, width: str, variant: Optional[str]) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")
    if width not in WIDTHS:
        raise ValueError(f"unknown width {width!r}; one of {', '.join(WIDTHS)}")
    if variant is not None and (arch != "SD1" or variant not in VARIANTS):
        raise ValueError(f"variant {variant!r} is not available for {arch} (SD1 has: {', '.join(VARIANTS)})")


def _clip_config(base: Mapping[str, Any], act: str, layers: int, width: str) -> Dict[str, Any]:
    vocab = _VOCAB[width]  # the real tokenizer's BOS/EOS are the last two ids
    return dict(base, num_hidden_layers=layers, max_position_embeddings=77, vocab_size=vocab, hidden_act=act,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)


def get_config(arch: str, width: str = "tiny", variant: Optional[str] = None) -> ArchConfig:
    """The :class:`ArchConfig` of ``arch`` ("SD1", "SD2", "SDXL", "SDXL-refiner", "VAE") at ``width``
    ("tiny" | "full"); ``variant`` ("inpainting" 9-channel, "instruct-pix2pix" 8-channel input) for SD1."""
    _check(arch, width, variant)
    in_ch = VARIANTS[variant] if variant else 4
    vch = _VAE_CH[width]
    vae = {"ddconfig": dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=vch,
                            ch_mult=list(_MULT[width]), num_res_blocks=2, attn_resolutions=[], dropout=0.0),
           "embed_dim": 4}
    dvae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=tuple(vch * m for m in _MULT[width]),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ldm = dunet = None
    tes: Tuple[TextEncoderSpec, ...] = ()
    if arch in ("SD1", "SD2"):
        ch = _UNET_CH[width]
        if arch == "SD1":
            ctx = _CLIP_L[width]["hidden_size"]
            heads: Dict[str, Any] = dict(num_heads=8)
            dheads: Any = 8
            tes = (TextEncoderSpec("text_encoder", "cond_stage_model.transformer.", "hf",
                                   _clip_config(_CLIP_L[width], "quick_gelu", 12, width), False),)
        else:
            ctx = _CLIP_H[width]["hidden_size"]
            hc = 64 if width == "full" else 8
            heads = dict(num_head_channels=hc, use_linear_in_transformer=True)
            dheads = tuple(ch * m // hc for m in _MULT[width])
            tes = (TextEncoderSpec("text_encoder", "cond_stage_model.model.", "openclip",
                                   _clip_config(_CLIP_H[width], "gelu", 24, width), True),)
        ldm = dict(image_size=32, in_channels=in_ch, out_channels=4, model_channels=ch, attention_resolutions=[4, 2, 1],
                   num_res_blocks=2, channel_mult=list(_MULT[width]), use_spatial_transformer=True, transformer_depth=1,
                   context_dim=ctx, use_checkpoint=False, legacy=False, **heads)
        dunet = dict(sample_size=64, in_channels=in_ch, out_channels=4, layers_per_block=2,
                     block_out_channels=tuple(ch * m for m in _MULT[width]),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=ctx, attention_head_dim=dheads, use_linear_projection=arch == "SD2")
    elif arch == "SDXL":
        chs = _SDXL_CH[width]
        l_cfg, g_cfg = _CLIP_L[width], _CLIP_G[width]
        hd = _SDXL_HEAD_DIM[width]
        dunet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=chs,
                     norm_num_groups=_SDXL_GROUPS[width],
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=tuple(c // hd for c in chs), transformer_layers_per_block=(1, 2, 10),
                     cross_attention_dim=l_cfg["hidden_size"] + g_cfg["hidden_size"], use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=_TIME_EMB[width],
                     projection_class_embeddings_input_dim=g_cfg["projection_dim"] + 6 * _TIME_EMB[width])
        tes = (TextEncoderSpec("text_encoder", "conditioner.embedders.0.transformer.", "hf",
                               _clip_config(l_cfg, "quick_gelu", 12, width), False),
               TextEncoderSpec("text_encoder_2", "conditioner.embedders.1.model.", "openclip",
                               _clip_config(g_cfg, "gelu", 32, width), True))
    elif arch == "SDXL-refiner":
        chs = _REFINER_CH[width]
        g_cfg = _CLIP_G[width]
        hd = _SDXL_HEAD_DIM[width]
        dunet = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=chs,
                     norm_num_groups=_SDXL_GROUPS[width],
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=tuple(c // hd for c in chs), transformer_layers_per_block=4,
                     cross_attention_dim=g_cfg["hidden_size"], use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=_TIME_EMB[width],
                     projection_class_embeddings_input_dim=g_cfg["projection_dim"] + 5 * _TIME_EMB[width])
        tes = (TextEncoderSpec("text_encoder_2", "conditioner.embedders.0.model.", "openclip",
                               _clip_config(g_cfg, "gelu", 32, width), True),)
    return ArchConfig(arch, width, variant, ldm, dunet, vae, dvae, tes)


def tiny_config(arch: str, variant: Optional[str] = None) -> ArchConfig:
    """:func:`get_config` at tiny width (UNet/VAE 32-64-96-96 channels, CLIP widths 32/64 with a 1024-token
    vocabulary; every depth and layer count as real, so the key names are those of the real checkpoint)."""
    return get_config(arch, "tiny", variant)


# ------------------------------------------------------------------------------------------------------ modules

class LdmAutoencoderKL(nn.Module):
    """The weights of ldm's ``AutoencoderKL`` (whose class needs pytorch_lightning) with the same attribute names:
    ``encoder``, ``decoder`` (ldm ``Encoder``/``Decoder``), ``quant_conv``, ``post_quant_conv``."""

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int = 4):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Mean and log-variance of the latent, concatenated on channels (as ldm's ``encode`` computes them)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


@contextlib.contextmanager
def _device_ctx(device: Optional[Union[str, torch.device]]) -> Iterator[None]:
    """Build on ``device`` (``meta``: no memory) and keep ldm's construction chatter off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        if device is None:
            yield
        else:
            with torch.device(device):
                yield


def build_ldm_unet(arch: str = "SD1", width: str = "tiny", variant: Optional[str] = None,
                   device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """The real ldm ``UNetModel`` of SD1/SD2 (default init; ``device="meta"`` allocates nothing)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = get_config(arch, width, variant)
    if cfg.ldm_unet is None:
        raise ValueError(f"the ldm package cannot build the {arch} UNet; use build_diffusers_unet")
    with _device_ctx(device):
        return UNetModel(**cfg.ldm_unet).eval()


def _diffusers() -> Any:
    """The ``diffusers`` package: the diffusers-layout builders need it; A1111 1.10.1 does not ship it."""
    try:
        import diffusers
    except ImportError:
        from lib_sdtoolkit.errors import MissingDependencyError

        raise MissingDependencyError("diffusers-layout sample models need the Python package 'diffusers', which "
                                     "is not installed here (pip install diffusers)") from None
    return diffusers


def build_diffusers_unet(arch: str = "SD1", width: str = "tiny", variant: Optional[str] = None,
                         device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """diffusers ``UNet2DConditionModel`` with the block structure of ``arch`` (default init)."""
    cfg = get_config(arch, width, variant)
    with _device_ctx(device):
        return _diffusers().UNet2DConditionModel(**cfg.diffusers_unet).eval()


def build_ldm_vae(width: str = "tiny", device: Optional[Union[str, torch.device]] = None) -> LdmAutoencoderKL:
    """ldm VAE (:class:`LdmAutoencoderKL`) as in every SD1/SD2/SDXL checkpoint."""
    cfg = get_config("VAE", width)
    with _device_ctx(device):
        return LdmAutoencoderKL(cfg.vae["ddconfig"], cfg.vae["embed_dim"]).eval()


def build_diffusers_vae(width: str = "tiny", device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """diffusers ``AutoencoderKL`` equivalent to :func:`build_ldm_vae`."""
    cfg = get_config("VAE", width)
    with _device_ctx(device):
        return _diffusers().AutoencoderKL(**cfg.diffusers_vae).eval()


def build_text_encoder(spec: TextEncoderSpec, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when the spec has a projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**spec.config)
    cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    with _device_ctx(device):
        return cls(config).eval()


# ------------------------------------------------------------------------------------------------------ layouts

@dataclass(frozen=True)
class KeySpec:
    name: str
    shape: Shape
    dtype: torch.dtype  # the "natural" dtype: float32 for weights, int64 for position_ids


def _text_specs(spec: TextEncoderSpec) -> List[KeySpec]:
    te = build_text_encoder(spec, device="meta")
    sd = te.state_dict()
    out: List[KeySpec] = []
    if spec.layout == "hf":
        for k, v in sd.items():
            if k.endswith("position_ids"):
                continue
            out.append(KeySpec(spec.prefix + k, tuple(v.shape), torch.float32))
            if k == "text_model.embeddings.position_embedding.weight":
                out.append(KeySpec(spec.prefix + "text_model.embeddings.position_ids", (1, 77), torch.int64))
        if not any(s.name.endswith("position_ids") for s in out):
            raise AssertionError("no position_embedding in CLIP state dict")
    else:
        oc = keymaps.openclip_from_hf(sd, logit_scale=torch.empty((), device="meta"))
        for k, v in oc.items():
            out.append(KeySpec(spec.prefix + k, tuple(v.shape), torch.float32))
    return out


def key_specs(arch: str, width: str = "tiny", variant: Optional[str] = None) -> List[KeySpec]:
    """The keys of a checkpoint of ``arch`` in module order (UNet, VAE, text encoders), computed from the real
    modules on the ``meta`` device. The ``VAE`` architecture gives bare VAE keys."""
    return list(_key_specs(arch, width, variant))


@functools.lru_cache(maxsize=None)
def _key_specs(arch: str, width: str, variant: Optional[str]) -> Tuple[KeySpec, ...]:
    return tuple(_compute_key_specs(arch, width, variant))


def _compute_key_specs(arch: str, width: str, variant: Optional[str]) -> List[KeySpec]:
    cfg = get_config(arch, width, variant)
    vae = build_ldm_vae(width, device="meta")
    vae_specs = [KeySpec(k, tuple(v.shape), torch.float32) for k, v in vae.state_dict().items()]
    if arch == "VAE":
        return vae_specs
    out: List[KeySpec] = []
    if cfg.ldm_unet is not None:
        unet = build_ldm_unet(arch, width, variant, device="meta")
        out += [KeySpec(keymaps.UNET_PREFIX + k, tuple(v.shape), torch.float32) for k, v in unet.state_dict().items()]
    else:
        dsd = build_diffusers_unet(arch, width, variant, device="meta").state_dict()
        ldm = keymaps.convert_unet_diffusers_to_ldm(dsd, arch)
        out += [KeySpec(k, tuple(v.shape), torch.float32) for k, v in ldm.items()]
    out += [KeySpec(keymaps.VAE_PREFIX + s.name, s.shape, s.dtype) for s in vae_specs]
    for spec in cfg.text_encoders:
        out += _text_specs(spec)
    return out


# ------------------------------------------------------------------------------------------------------ tensors

def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") >> 1


_CHUNK = 1 << 20


def make_tensor(key: str, shape: Shape, seed: int = 0, dtype: torch.dtype = torch.float32,
                natural: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic value of ``key`` for ``seed`` (independent of any other key)."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32).reshape(shape).to(dtype)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    out_dtype = dtype if natural.is_floating_point else natural
    n = math.prod(shape)
    out = torch.empty(n, dtype=out_dtype)
    # generated in chunks of _CHUNK values straight into the output: a full-width embedding never exists in fp32
    for i in range(0, n, _CHUNK):
        part = torch.randn(min(_CHUNK, n - i), generator=g, dtype=torch.float32).mul_(0.02)
        if len(shape) == 1 and key.endswith(".weight"):
            part.add_(1.0)  # norm scales
        out[i:i + part.numel()] = part
    return out.reshape(shape)


def _ddpm_buffers() -> Dict[str, torch.Tensor]:
    """The DDPM schedule buffers LatentDiffusion saves (linear schedule 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in bufs.items()}


#: the DDPM schedule buffers :func:`write_checkpoint` adds with ``junk=True``
DDPM_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
#: the junk keys :func:`write_checkpoint` adds with ``junk=True`` besides :data:`DDPM_KEYS`
JUNK_EXTRA_KEYS = ("logvar", "loss.logvar", "loss.discriminator.main.0.weight", "loss.discriminator.main.0.bias",
                   "loss.discriminator.main.2.weight", "loss.discriminator.main.3.weight",
                   "loss.discriminator.main.3.bias")
_JUNK_SHAPES = {"logvar": (1000,), "loss.logvar": (), "loss.discriminator.main.0.weight": (64, 3, 4, 4),
                "loss.discriminator.main.0.bias": (64,), "loss.discriminator.main.2.weight": (128, 64, 4, 4),
                "loss.discriminator.main.3.weight": (128,), "loss.discriminator.main.3.bias": (128,)}
BROKEN_POSITION_IDS_FACTOR = 0.999967  # 76 * f = 75.9975, the kind of value merges leave behind


@dataclass
class _Plan:
    """What a file will hold: specs in write order, and a function giving each tensor."""

    specs: List[Tuple[str, torch.dtype, Shape]]
    values: Dict[str, Any]  # name -> zero-arg callable


def _plan(arch: str, width: str, variant: Optional[str], seed: int, dtype: torch.dtype, ema: bool, junk: bool,
          broken_position_ids: bool, vae_prefix: bool) -> _Plan:
    entries: Dict[str, Tuple[torch.dtype, Shape, Any]] = {}
    for s in key_specs(arch, width, variant):
        name = s.name
        if arch == "VAE" and vae_prefix:
            name = keymaps.VAE_PREFIX + name
        if s.name.endswith("position_ids") and broken_position_ids:
            entries[name] = (torch.float32, s.shape, lambda shape=s.shape: (
                torch.arange(shape[-1], dtype=torch.float32) * BROKEN_POSITION_IDS_FACTOR).reshape(shape))
            continue
        out_dtype = dtype if s.dtype.is_floating_point else s.dtype
        # the VAE's values do not depend on its prefix: a checkpoint's VAE equals the bare VAE of the same seed
        seed_name = s.name[len(keymaps.VAE_PREFIX):] if s.name.startswith(keymaps.VAE_PREFIX) else s.name
        entries[name] = (out_dtype, s.shape, lambda n=seed_name, sh=s.shape, nat=s.dtype:
                         make_tensor(n, sh, seed, dtype, nat))
    if ema:
        unet = [k for k in entries if k.startswith(keymaps.UNET_PREFIX)]
        if not unet:
            raise ValueError(f"ema=True needs a UNet; {arch} has none")
        entries["model_ema.decay"] = (torch.float32, (), lambda: torch.tensor(0.9999, dtype=torch.float32))
        entries["model_ema.num_updates"] = (torch.int32, (), lambda: torch.tensor(470000, dtype=torch.int32))
        for k in unet:
            d, sh, _ = entries[k]
            # EMA weights: the model's weights plus a small deterministic drift
            entries[keymaps.ema_key_of(k)] = (d, sh, lambda k=k, sh=sh: (
                make_tensor(k, sh, seed, torch.float32) + make_tensor("ema:" + k, sh, seed, torch.float32) * 0.01
            ).to(dtype))
    if junk:
        bufs = _ddpm_buffers()
        for k, v in bufs.items():
            entries[k] = (torch.float32, tuple(v.shape), lambda v=v: v.clone())
        for k in JUNK_EXTRA_KEYS:
            sh = _JUNK_SHAPES[k]
            if k.endswith("logvar"):
                entries[k] = (torch.float32, sh, lambda sh=sh: torch.zeros(sh, dtype=torch.float32))
            else:
                entries[k] = (torch.float32, sh, lambda k=k, sh=sh: make_tensor(k, sh, seed, torch.float32))
    names = sorted(entries)  # safetensors files from the usual tools are sorted by name
    return _Plan([(n, entries[n][0], entries[n][1]) for n in names], {n: entries[n][2] for n in names})


def iter_state_dict(arch: str, width: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, *,
                    variant: Optional[str] = None, ema: bool = False, junk: bool = False,
                    broken_position_ids: bool = False, vae_prefix: bool = False
                    ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, sorted by key; at full width this never holds more than one tensor."""
    plan = _plan(arch, width, variant, seed, dtype, ema, junk, broken_position_ids, vae_prefix)
    for name, _, _ in plan.specs:
        yield name, plan.values[name]()


def build_state_dict(arch: str, width: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, *,
                     variant: Optional[str] = None, ema: bool = False, junk: bool = False,
                     broken_position_ids: bool = False, vae_prefix: bool = False) -> Dict[str, torch.Tensor]:
    """A full checkpoint state dict of ``arch`` with real key names (``model.diffusion_model.*``,
    ``first_stage_model.*``, text encoders). ``arch="VAE"`` gives a bare VAE (``vae_prefix`` adds
    ``first_stage_model.``). Options as :func:`write_checkpoint`. Refuses ``width="full"`` (use the streaming
    writer)."""
    if width == "full":
        raise ValueError("build_state_dict(width='full') would hold a whole model in RAM; use write_checkpoint")
    return dict(iter_state_dict(arch, width, seed, dtype, variant=variant, ema=ema, junk=junk,
                                broken_position_ids=broken_position_ids, vae_prefix=vae_prefix))


def component_state_dicts(arch: str, width: str = "tiny", seed: int = 0, variant: Optional[str] = None
                          ) -> Dict[str, Dict[str, torch.Tensor]]:
    """The weights of :func:`build_state_dict` split per component, in the naming each module class loads:
    ``unet`` (ldm UNetModel names for SD1/SD2, sgm names for SDXL, no prefix), ``unet_diffusers``, ``vae`` (bare
    ldm), ``vae_diffusers``, ``text_encoder`` / ``text_encoder_2`` (transformers names, no position_ids)."""
    sd = build_state_dict(arch, width, seed, variant=variant)
    cfg = get_config(arch, width, variant)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    if arch == "VAE":
        vae = sd
    else:
        vae = {k[len(keymaps.VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(keymaps.VAE_PREFIX)}
        out["unet"] = {k[len(keymaps.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(keymaps.UNET_PREFIX)}
        out["unet_diffusers"] = keymaps.convert_unet_ldm_to_diffusers(sd, arch)
        for spec in cfg.text_encoders:
            part = {k[len(spec.prefix):]: v for k, v in sd.items() if k.startswith(spec.prefix)}
            if spec.layout == "openclip":
                part = keymaps.hf_from_openclip(part)
            else:
                part = {k: v for k, v in part.items() if not k.endswith("position_ids")}
            out[spec.component] = part
    out["vae"] = vae
    out["vae_diffusers"] = keymaps.convert_vae_ldm_to_diffusers(vae)
    return out


def build_modules(arch: str, width: str = "tiny", seed: int = 0, variant: Optional[str] = None,
                  diffusers: bool = False) -> Dict[str, nn.Module]:
    """Real modules holding exactly the weights of :func:`build_state_dict` (tiny width only), in eval mode:
    ``unet`` (ldm UNetModel for SD1/SD2 unless ``diffusers``; diffusers UNet2DConditionModel for SDXL),
    ``vae`` (:class:`LdmAutoencoderKL`, or diffusers AutoencoderKL with ``diffusers``), ``text_encoder``,
    ``text_encoder_2`` (transformers CLIP). Loading is ``strict=True``: a key mismatch raises."""
    if width != "tiny":
        raise ValueError("build_modules materialises weights; tiny width only")
    parts = component_state_dicts(arch, width, seed, variant)
    cfg = get_config(arch, width, variant)
    mods: Dict[str, nn.Module] = {}
    if arch != "VAE":
        if cfg.ldm_unet is not None and not diffusers:
            unet = build_ldm_unet(arch, width, variant)
            unet.load_state_dict(parts["unet"], strict=True)
        else:
            unet = build_diffusers_unet(arch, width, variant)
            unet.load_state_dict(parts["unet_diffusers"], strict=True)
        mods["unet"] = unet
        for spec in cfg.text_encoders:
            te = build_text_encoder(spec)
            missing, unexpected = te.load_state_dict(parts[spec.component], strict=False)
            if unexpected or [m for m in missing if not m.endswith("position_ids")]:
                raise RuntimeError(f"{spec.component}: missing {missing}, unexpected {unexpected}")
            mods[spec.component] = te
    if diffusers:
        vae = build_diffusers_vae(width)
        vae.load_state_dict(parts["vae_diffusers"], strict=True)
    else:
        vae = build_ldm_vae(width)
        vae.load_state_dict(parts["vae"], strict=True)
    mods["vae"] = vae
    return mods


# ------------------------------------------------------------------------------------------------------ files

def write_checkpoint(path: PathLike, arch: str, *, width: str = "tiny", dtype: torch.dtype = torch.float32,
                     seed: int = 0, variant: Optional[str] = None, ema: bool = False, junk: bool = False,
                     broken_position_ids: bool = False, vae_prefix: bool = False,
                     metadata: Optional[Mapping[str, str]] = None, overwrite: bool = False,
                     epoch: int = 6, global_step: int = 470000) -> Path:
    """Write a checkpoint of ``arch`` to ``path``; the format follows the suffix.

    ``.safetensors``: streamed through ``StreamingSafetensorsWriter`` one tensor at a time (any width).
    ``.ckpt`` / ``.pt`` / ``.pth``: ``{"state_dict": ..., "epoch": epoch, "global_step": global_step}`` via
    ``save_ckpt`` (tiny width only: a pickle is written from memory).
    ``ema``: ``model_ema.*`` copies of the UNet with dot-less names + ``model_ema.decay`` / ``num_updates``.
    ``junk``: DDPM schedule buffers (shape 1000), ``logvar``, ``loss.*`` discriminator keys.
    ``broken_position_ids``: float32 CLIP position_ids with ``75.9975``-style values.
    ``vae_prefix``: for ``arch="VAE"``, name keys ``first_stage_model.*`` instead of bare.
    """
    from lib_sdtoolkit import files

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        plan = _plan(arch, width, variant, seed, dtype, ema, junk, broken_position_ids, vae_prefix)
        meta = dict(metadata or {})
        with files.StreamingSafetensorsWriter(path, plan.specs, metadata=meta or None, overwrite=overwrite) as w:
            for name, _, _ in plan.specs:
                w.write(name, plan.values[name]())
    elif suffix in (".ckpt", ".pt", ".pth"):
        if width != "tiny":
            raise ValueError("full-width checkpoints are written as .safetensors only (streaming)")
        sd = build_state_dict(arch, width, seed, dtype, variant=variant, ema=ema, junk=junk,
                              broken_position_ids=broken_position_ids, vae_prefix=vae_prefix)
        files.save_ckpt(path, sd, extra={"epoch": epoch, "global_step": global_step}, overwrite=overwrite)
    else:
        raise ValueError(f"{path}: unsupported suffix {suffix!r} (.safetensors, .ckpt, .pt, .pth)")
    return path


def write_sample_library(models_dir: PathLike) -> Dict[str, Path]:
    """Create a small WebUI-like models folder under ``models_dir`` (tiny models, a few MB, seconds):

    ``Stable-diffusion/sd15-tiny.safetensors`` (SD1, fp16), ``Stable-diffusion/sdxl-tiny.safetensors`` (SDXL, fp16),
    ``VAE/vae-tiny.safetensors`` and its byte-identical duplicate ``VAE/vae-tiny-copy.safetensors``,
    ``Lora/sample-lora-sd15.safetensors`` (a kohya LoRA for the SD1 sample) and an empty ``ControlNet/``.
    Files already there are left alone. Returns ``{name: path}``."""
    root = Path(models_dir)
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    meta = {"sdtoolkit_sample": "1"}
    todo = {
        "sd15-tiny": (root / "Stable-diffusion" / "sd15-tiny.safetensors", "SD1", 1),
        "sdxl-tiny": (root / "Stable-diffusion" / "sdxl-tiny.safetensors", "SDXL", 2),
        "vae-tiny": (root / "VAE" / "vae-tiny.safetensors", "VAE", 3),
        "vae-tiny-copy": (root / "VAE" / "vae-tiny-copy.safetensors", "VAE", 3),
    }
    out: Dict[str, Path] = {}
    for name, (p, arch, seed) in todo.items():
        if not p.exists():
            write_checkpoint(p, arch, dtype=torch.float16, seed=seed, metadata=meta)
        out[name] = p
    # a kohya LoRA (attention + conv, rank 4) with the key names of a real SD1.5 LoRA, for the sample checkpoint
    lora = root / "Lora" / "sample-lora-sd15.safetensors"
    if not lora.exists():
        from lib_sdtoolkit import files
        from lib_sdtoolkit.lora.synth import attention_and_conv, make_lora_state_dict

        with files.open_model(out["sd15-tiny"]) as r:
            shapes = {k: i.shape for k, i in r.infos().items()}
        sd = make_lora_state_dict(shapes.get, "SD1", rank=4, seed=4, name_filter=attention_and_conv,
                                  dtype=torch.float16)
        files.save_safetensors(lora, sd, {**meta, "ss_output_name": "sample-lora-sd15", "ss_network_dim": "4",
                                          "ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    out["sample-lora-sd15"] = lora
    return out
