"""Whole-VAE helpers: load an SD VAE from a file, decode latents to images and encode images to latents (tiled
or full), latent files.

A VAE is loaded from a standalone VAE file (ldm names ``encoder.*``/``decoder.*``, or diffusers names, which are
converted through :mod:`lib_sdtoolkit.arch.keymaps`) or from a checkpoint's ``first_stage_model.*`` keys, into
the real ldm ``Encoder``/``Decoder`` modules (the WebUI's). Scaling factor: 0.18215 (SD1/SD2), 0.13025 (SDXL,
detected for checkpoints; for a bare VAE file pass ``sdxl=True`` or a factor).

The 16-channel VAE of Flux.1 and SD3 (BFL ``ae.safetensors``: ldm names, bare; diffusers ``AutoencoderKL`` with
``latent_channels=16`` and no quant convs; the ``vae.`` part of a Flux all-in-one file; ``first_stage_model.`` of an
SD3 one) has no ``quant_conv``/``post_quant_conv``: they are identities here. Its latents are scaled *and shifted*:
``latent = (mean - shift) * scale`` and ``z = latent / scale + shift`` (diffusers' Flux/SD3 pipelines): Flux.1
(and Z-Image, which uses its VAE) scale 0.3611, shift 0.1159; SD3 1.5305 / 0.0609. The two VAEs have the same
structure, so a bare 16-channel file gets Flux's factors (pass ``scaling_factor``/``shift_factor`` for SD3's); one
inside an SD3 checkpoint gets SD3's.
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
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609
VAE_PREFIX = "first_stage_model."
#: the VAE inside a Flux.1 all-in-one checkpoint (ComfyUI / Forge)
FLUX_VAE_PREFIX = "vae."
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LATENT_KEY = "latent"


class VAEModel(nn.Module):
    """ldm AutoencoderKL's modules with their checkpoint names (``encoder``, ``decoder``, ``quant_conv``,
    ``post_quant_conv``); ``scaling_factor``, ``shift_factor`` and ``source`` describe where it came from.
    ``quant=False`` (the 16-channel Flux/SD3 VAE): the quant convs are identities."""

    def __init__(self, ddconfig: Mapping, embed_dim: int, scaling_factor: float = SD_SCALE, source: str = "",
                 quant: bool = True, shift_factor: float = 0.0):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        with contextlib.redirect_stdout(io.StringIO()):  # ldm prints its construction
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        if quant:
            self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        else:
            self.quant_conv = nn.Identity()
            self.post_quant_conv = nn.Identity()
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.source = source


def has_quant_convs(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a bare ldm VAE state dict has ``quant_conv``/``post_quant_conv`` (SD's VAEs; not the 16-channel
    Flux/SD3 VAE). Only one of the two is an incomplete file."""
    q, pq = "quant_conv.weight" in sd, "post_quant_conv.weight" in sd
    if q != pq:
        raise ArchitectureError(f"VAE weights incomplete: {'post_quant_conv' if q else 'quant_conv'}.weight missing "
                                f"(an SD VAE has both quant convs, a Flux/SD3 VAE neither)")
    return q


def infer_ddconfig(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict, int]:
    """ldm ddconfig and embed_dim from a bare ldm VAE state dict's shapes (embed_dim = z_channels without quant
    convs)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_ch = sd["encoder.conv_in.weight"].shape[1]
        z = sd["decoder.conv_in.weight"].shape[1]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
        embed = sd["post_quant_conv.weight"].shape[1] if has_quant_convs(sd) else z
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
    for prefix in (VAE_PREFIX, FLUX_VAE_PREFIX):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if any(k.startswith("decoder.up_blocks.") or k.startswith("encoder.down_blocks.") for k in sd):
        from ..arch import keymaps
        return keymaps.convert_vae_diffusers_to_ldm(
            {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))})
    if any(k.startswith("decoder.") for k in sd):
        return {k: v for k, v in sd.items()
                if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    raise ModelFileError("no VAE weights found (neither encoder./decoder. nor first_stage_model. keys)", path)


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, sdxl: Optional[bool] = None,
             scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None) -> VAEModel:
    """Load a VAE from a VAE file or a checkpoint (safetensors / ckpt, via ``open_model``): SD's 4-channel VAE, or
    the 16-channel Flux/SD3 one (``ae.safetensors``, diffusers names, or inside a Flux / SD3 checkpoint)."""
    if isinstance(device, str):
        device = check_device(device)  # 'cuda' without CUDA, a typo: a clear 422, before the file is read
    with open_model(path) as r:
        all_keys = r.keys()
        if any(k.startswith(VAE_PREFIX) for k in all_keys):
            prefix = VAE_PREFIX
        elif any(k.startswith(FLUX_VAE_PREFIX + "decoder.") for k in all_keys):
            prefix = FLUX_VAE_PREFIX
        else:
            prefix = ""
        keys = [k for k in all_keys if k.startswith(prefix) and k[len(prefix):].startswith(_VAE_ROOTS)]
        if not keys:
            raise ModelFileError("no VAE weights found (neither encoder./decoder. nor first_stage_model. / vae. "
                                 "keys)", path)
        is_sdxl = sdxl
        arch = None
        if prefix:
            from ..arch import detect
            arch = detect(r.infos()).architecture
            if is_sdxl is None:
                is_sdxl = arch.startswith("SDXL")
        sd = {k: r.get(k) for k in keys}
    sd = _as_ldm_vae_dict(sd, path)
    try:
        cfg, embed = infer_ddconfig(sd)
    except ArchitectureError as e:
        if e.path is None:
            raise ArchitectureError(e.message, path) from None
        raise
    except (IndexError, ZeroDivisionError, ValueError, TypeError) as e:  # shapes of the wrong rank or size
        raise ArchitectureError(f"not an SD VAE: its tensor shapes do not fit ({type(e).__name__}: {e})",
                                path) from None
    quant = has_quant_convs(sd)
    if quant:
        factor, shift = scaling_factor or (SDXL_SCALE if is_sdxl else SD_SCALE), shift_factor or 0.0
    else:  # the 16-channel VAE: SD3's factors inside an SD3 checkpoint, Flux's otherwise (see the module docstring)
        scale0, shift0 = (SD3_SCALE, SD3_SHIFT) if arch == "SD3" else (FLUX_SCALE, FLUX_SHIFT)
        factor = scaling_factor or scale0
        shift = shift0 if shift_factor is None else shift_factor
    try:
        vae = VAEModel(cfg, embed, factor, source=str(path), quant=quant, shift_factor=float(shift))
        missing, unexpected = vae.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ArchitectureError(f"not an SD VAE this tool can build ({type(e).__name__}: {first})", path) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ArchitectureError(f"VAE weights incomplete: {len(missing)} missing, e.g. {missing[0]}", path)
    return vae.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------- decode/encode

def decode(vae: nn.Module, latent: torch.Tensor, cfg: Optional[TiledVAEConfig] = None, full: bool = False,
           scaled: bool = True) -> torch.Tensor:
    """Image tensor in [-1, 1] from a latent (``scaled``: multiplied by the model's scaling factor, as samplers
    produce it). ``full`` runs the decoder as is; otherwise tiled with ``cfg``."""
    check_latent(vae, latent)
    factor = getattr(vae, "scaling_factor", SD_SCALE)
    shift = float(getattr(vae, "shift_factor", 0.0) or 0.0)
    dt = next(vae.parameters()).dtype
    dev = next(vae.parameters()).device
    z = latent.to(dev, dt)
    if scaled:
        z = z / factor
        if shift:
            z = z + shift
    with torch.no_grad():
        h = vae.post_quant_conv(z)
        return vae.decoder(h) if full else tiled_decode(vae.decoder, h, cfg)


def encode(vae: nn.Module, image: torch.Tensor, cfg: Optional[TiledVAEConfig] = None, full: bool = False,
           scaled: bool = True) -> torch.Tensor:
    """Latent (the posterior's mean; when ``scaled``, minus the shift factor and times the scaling factor) of an image
    tensor in [-1, 1]."""
    factor = getattr(vae, "scaling_factor", SD_SCALE)
    shift = float(getattr(vae, "shift_factor", 0.0) or 0.0)
    p = next(vae.parameters())
    x = image.to(p.device, p.dtype)
    with torch.no_grad():
        h = vae.encoder(x) if full else tiled_encode(vae.encoder, x, cfg)
        moments = vae.quant_conv(h)
    mean = moments[:, : moments.shape[1] // 2]
    if not scaled:
        return mean
    return ((mean - shift) if shift else mean) * factor


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
    """(latent, scaled, factor from the file or None). Files without our metadata count as scaled.

    Refused with the file named: no tensor ``latent``, a tensor that is not [B, C, h, w] floats with B, h, w >= 1,
    or a ``sdtoolkit.scaling_factor`` that is not a finite number > 0. The channel count is checked against the
    VAE by :func:`check_latent` (4 for SD1/SD2/SDXL VAEs)."""
    with open_model(path) as r:
        if LATENT_KEY not in r:
            raise ModelFileError(f"no tensor '{LATENT_KEY}' (a latent file holds one tensor 'latent' [1,4,h,w])", path)
        info = r.info(LATENT_KEY)
        if len(info.shape) != 4:
            raise InvalidInputError(f"latent must be [B, C, h, w], got {list(info.shape)}", path, LATENT_KEY)
        if min(info.shape) < 1:
            raise InvalidInputError(f"latent {list(info.shape)} is empty", path, LATENT_KEY)
        if not info.dtype.is_floating_point:
            raise InvalidInputError(f"latent must hold floats, not {str(info.dtype).replace('torch.', '')}",
                                    path, LATENT_KEY)
        t = r.get(LATENT_KEY)
        meta = r.metadata or {}
    scaled = meta.get("sdtoolkit.latent_scaled", "true").strip().lower() != "false"
    f = meta.get("sdtoolkit.scaling_factor")
    factor: Optional[float] = None
    if f is not None and f.strip():
        try:
            factor = float(f)
        except ValueError:
            factor = None
        if factor is None or not math.isfinite(factor) or factor <= 0:
            raise InvalidInputError(f"metadata sdtoolkit.scaling_factor {f[:40]!r} is not a finite number > 0 "
                                    f"(0.18215 for SD1/SD2, 0.13025 for SDXL)", path)
    return t, scaled, factor


def read_latent_bytes(raw: bytes, what: str = "latent") -> Tuple[torch.Tensor, bool, Optional[float]]:
    """:func:`read_latent` of a latent file given as bytes (an upload); errors name ``what``, not a temp file."""
    import os
    import tempfile

    from ..errors import SdToolkitError

    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            return read_latent(tmp)
        except SdToolkitError as e:
            raise InvalidInputError(f"{what}: {e.message}") from None
    finally:
        os.unlink(tmp)


def latent_from_list(data: list) -> torch.Tensor:
    """A latent from a nested list ([B, C, h, w], or [C, h, w] for one), float32."""
    try:
        lat = torch.tensor(data, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidInputError("latent must be a rectangular nested list of numbers [1, C, h, w] "
                                "(ragged or non-numeric)") from None
    return lat[None] if lat.ndim == 3 else lat


def compare_images(a, b) -> str:
    """Two images of one size: max |d| in 8-bit steps, share of pixels off by more than 1, PSNR."""
    x = np.asarray(a).astype(np.int16)
    y = np.asarray(b).astype(np.int16)
    d = np.abs(x - y)
    mse = float((d.astype(np.float64) ** 2).mean())
    psnr = "inf" if mse == 0 else f"{10 * math.log10(255 ** 2 / mse):.1f}"
    return (f"tiled vs full: max |d| = {int(d.max())}/255, {100 * float((d > 1).mean()):.2f}% pixels off by more "
            f"than 1, PSNR {psnr} dB")


def latent_channels(vae: nn.Module) -> Optional[int]:
    """The channel count of the latents ``vae`` decodes (its post_quant_conv's input, or the decoder's first conv's
    where the quant convs are identities), None if unknown."""
    conv = getattr(vae, "post_quant_conv", None)
    if isinstance(conv, nn.Conv2d):
        return int(conv.in_channels)
    conv = getattr(getattr(vae, "decoder", None), "conv_in", None)
    return int(conv.in_channels) if isinstance(conv, nn.Conv2d) else None


def check_latent(vae: nn.Module, latent: torch.Tensor, path: Optional[str] = None) -> None:
    """Refuse a latent this VAE cannot decode, saying what it can (raises ``InvalidInputError``)."""
    if latent.ndim != 4 or min(latent.shape) < 1:
        raise InvalidInputError(f"latent must be [B, C, h, w] with no empty axis, got {list(latent.shape)}", path)
    want = latent_channels(vae)
    got = int(latent.shape[1])
    if want is not None and got != want:
        src = getattr(vae, "source", "") or "this VAE"
        also = (" (16-channel latents come from the Flux/SD3 VAE, ae.safetensors)" if got == 16 and want == 4 else
                " (4-channel latents come from SD1/SD2/SDXL VAEs)" if got == 4 and want == 16 else "")
        raise InvalidInputError(f"the latent has {got} channels but the VAE {src} decodes {want}-channel latents"
                                f"{also}", path)
