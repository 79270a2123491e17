"""Whole-VAE helpers: load an SD VAE from a file, decode latents to images and encode images to latents (tiled
or full), latent files.

A VAE is loaded from a standalone VAE file (ldm names ``encoder.*``/``decoder.*``, or diffusers names, which are
converted through :mod:`lib_sdtoolkit.arch.keymaps`) or from a checkpoint's ``first_stage_model.*`` keys, into
the real ldm ``Encoder``/``Decoder`` modules (the WebUI's). Scaling factor: 0.18215 (SD1/SD2), 0.13025 (SDXL,
detected for checkpoints; for a bare VAE file pass ``sdxl=True`` or a factor).
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ArchitectureError, InvalidInputError, ModelFileError
from ..files import open_model, save_safetensors
from ..validate import check_device
from . import TiledVAEConfig, tiled_decode, tiled_encode

SD_SCALE = 0.18215
SDXL_SCALE = 0.13025
VAE_PREFIX = "first_stage_model."
LATENT_KEY = "latent"


class VAEModel(nn.Module):
    """ldm AutoencoderKL's modules with their checkpoint names (``encoder``, ``decoder``, ``quant_conv``,
    ``post_quant_conv``); ``scaling_factor`` and ``source`` describe where it came from."""

    def __init__(self, ddconfig: Mapping, embed_dim: int, scaling_factor: float = SD_SCALE, source: str = ""):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        with contextlib.redirect_stdout(io.StringIO()):  # ldm prints its construction
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.scaling_factor = scaling_factor
        self.source = source


def infer_ddconfig(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict, int]:
    """ldm ddconfig and embed_dim from a bare ldm VAE state dict's shapes."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_ch = sd["encoder.conv_in.weight"].shape[1]
        z = sd["decoder.conv_in.weight"].shape[1]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
        embed = sd["post_quant_conv.weight"].shape[1]
        double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z
    except KeyError as e:
        raise ArchitectureError(f"not an SD VAE: key {e.args[0]} missing") from None
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    nrb = len({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m})
    mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels]
    cfg = dict(double_z=bool(double_z), z_channels=int(z), resolution=256, in_channels=int(in_ch),
               out_ch=int(out_ch), ch=int(ch), ch_mult=mult, num_res_blocks=nrb, attn_resolutions=[], dropout=0.0)
    return cfg, int(embed)


def _as_ldm_vae_dict(sd: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    if any(k.startswith(VAE_PREFIX) for k in sd):
        return {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if any(k.startswith("decoder.up_blocks.") or k.startswith("encoder.down_blocks.") for k in sd):
        from ..arch import keymaps
        return keymaps.convert_vae_diffusers_to_ldm(
            {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))})
    if any(k.startswith("decoder.") for k in sd):
        return {k: v for k, v in sd.items()
                if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    raise ModelFileError("no VAE weights found (neither encoder./decoder. nor first_stage_model. keys)", path)


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, sdxl: Optional[bool] = None,
             scaling_factor: Optional[float] = None) -> VAEModel:
    """Load an SD VAE from a VAE file or a checkpoint (safetensors / ckpt, via ``open_model``)."""
    if isinstance(device, str):
        device = check_device(device)  # 'cuda' without CUDA, a typo: a clear 422, before the file is read
    with open_model(path) as r:
        keys = [k for k in r.keys() if k.startswith(VAE_PREFIX) or k.startswith(
            ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
        if not keys:
            raise ModelFileError("no VAE weights found (neither encoder./decoder. nor first_stage_model. keys)", path)
        is_sdxl = sdxl
        if is_sdxl is None and any(k.startswith(VAE_PREFIX) for k in keys):
            from ..arch import detect
            is_sdxl = detect(r.infos()).architecture.startswith("SDXL")
        sd = {k: r.get(k) for k in keys}
    sd = _as_ldm_vae_dict(sd, path)
    cfg, embed = infer_ddconfig(sd)
    factor = scaling_factor or (SDXL_SCALE if is_sdxl else SD_SCALE)
    vae = VAEModel(cfg, embed, factor, source=str(path))
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ArchitectureError(f"VAE weights incomplete: {len(missing)} missing, e.g. {missing[0]}", path)
    return vae.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------- decode/encode

def decode(vae: nn.Module, latent: torch.Tensor, cfg: Optional[TiledVAEConfig] = None, full: bool = False,
           scaled: bool = True) -> torch.Tensor:
    """Image tensor in [-1, 1] from a latent (``scaled``: multiplied by the model's scaling factor, as samplers
    produce it). ``full`` runs the decoder as is; otherwise tiled with ``cfg``."""
    factor = getattr(vae, "scaling_factor", SD_SCALE)
    dt = next(vae.parameters()).dtype
    dev = next(vae.parameters()).device
    z = latent.to(dev, dt)
    if scaled:
        z = z / factor
    with torch.no_grad():
        h = vae.post_quant_conv(z)
        return vae.decoder(h) if full else tiled_decode(vae.decoder, h, cfg)


def encode(vae: nn.Module, image: torch.Tensor, cfg: Optional[TiledVAEConfig] = None, full: bool = False,
           scaled: bool = True) -> torch.Tensor:
    """Latent (the posterior's mean, times the scaling factor when ``scaled``) of an image tensor in [-1, 1]."""
    factor = getattr(vae, "scaling_factor", SD_SCALE)
    p = next(vae.parameters())
    x = image.to(p.device, p.dtype)
    with torch.no_grad():
        h = vae.encoder(x) if full else tiled_encode(vae.encoder, x, cfg)
        moments = vae.quant_conv(h)
    mean = moments[:, : moments.shape[1] // 2]
    return mean * factor if scaled else mean


def to_pil(img: torch.Tensor):
    """First image of a [-1, 1] batch as a PIL RGB image."""
    from PIL import Image
    a = ((img[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def from_pil(im) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1]; width/height must be multiples of 8."""
    im = im.convert("RGB")
    if im.width % 8 or im.height % 8:
        raise InvalidInputError(f"image size {im.width}x{im.height} is not a multiple of 8")
    a = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return a.unsqueeze(0)


def save_latent(path: str, latent: torch.Tensor, scaled: bool, factor: float, overwrite: bool = False,
                extra: Optional[Dict[str, str]] = None) -> None:
    meta = {"sdtoolkit.latent_scaled": "true" if scaled else "false", "sdtoolkit.scaling_factor": repr(factor)}
    meta.update(extra or {})
    save_safetensors(path, {LATENT_KEY: latent.detach().float().cpu().contiguous()}, metadata=meta,
                     overwrite=overwrite)


def read_latent(path: str) -> Tuple[torch.Tensor, bool, Optional[float]]:
    """(latent, scaled, factor from the file or None). Files without our metadata count as scaled."""
    with open_model(path) as r:
        if LATENT_KEY not in r:
            raise ModelFileError(f"no tensor '{LATENT_KEY}' (a latent file holds one tensor 'latent' [1,4,h,w])", path)
        t = r.get(LATENT_KEY)
        meta = r.metadata or {}
    if t.ndim != 4:
        raise InvalidInputError(f"latent must be [B, C, h, w], got {tuple(t.shape)}", path, LATENT_KEY)
    scaled = meta.get("sdtoolkit.latent_scaled", "true").lower() != "false"
    f = meta.get("sdtoolkit.scaling_factor")
    if f:
        try:
            f = float(f)
        except (TypeError, ValueError):
            f = float("nan")
        if not math.isfinite(f) or f == 0:
            raise InvalidInputError(f"metadata sdtoolkit.scaling_factor {meta.get('sdtoolkit.scaling_factor')!r} "
                                    f"is not a finite non-zero number", path)
    return t, scaled, (f if f else None)
