"""``POST /sdtoolkit/v1/vae/decode``: a latent (base64 safetensors or a nested list) -> PNG (base64), tiled.

Body: ``{"vae": name-or-path, "latent": [[[[...]]]] | "latent_safetensors_b64": "...", "scaled": true,
"tile_size": px | null, "fast": false, "full": false}``. Answer: ``{"image": base64 PNG, "plan": "...",
"width": W, "height": H}``. Errors: 4xx ``{"detail": ...}`` (raised as SdToolkitError, mapped by the app).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import tempfile
from typing import Any, List, Optional

from fastapi import APIRouter
from pydantic import BaseModel

from ..errors import InvalidInputError, SdToolkitError
from ..host import Host
from ..validate import MAX_LATENT_CHANNELS, MAX_LATENT_HW, MAX_LATENT_SIDE, check_device

PATH = "/sdtoolkit/v1/vae/decode"


class DecodeRequest(BaseModel):
    vae: str
    latent: Optional[List[Any]] = None
    latent_safetensors_b64: Optional[str] = None
    scaled: bool = True
    tile_size: Optional[int] = None
    fast: bool = False
    full: bool = False
    device: Optional[str] = None


#: tile_size bounds (image pixels); 0 / null = chosen by the planner
MIN_TILE_PX, MAX_TILE_PX = 8, 4096
#: tiles one decode may be cut into (a tiny tile_size on a large latent would mean hours of work)
MAX_TILES = 4096


def _latent_from_list(data: List[Any]) -> "Any":
    import torch

    try:
        lat = torch.tensor(data, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InvalidInputError("latent must be a rectangular nested list of numbers [1, C, h, w] "
                                "(ragged or non-numeric)") from None
    if lat.ndim == 3:
        lat = lat[None]
    return lat


def _latent_from_b64(data: str) -> "Any":
    from ..tiled_vae.vae import read_latent

    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("latent_safetensors_b64 is not valid base64") from None
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            return read_latent(tmp)
        except SdToolkitError as e:  # name the field, not our temp file
            raise InvalidInputError(f"latent_safetensors_b64: {e.message}") from None
    finally:
        os.unlink(tmp)


def bound_latent(lat: "Any") -> "Any":
    """A [B, C, h, w] latent within the API's size bounds, finite; returns its first item [1, C, h, w] (the route
    answers one image). Whether the VAE takes its channels is :func:`lib_sdtoolkit.tiled_vae.vae.check_latent`."""
    import torch

    if lat.ndim != 4:
        raise InvalidInputError(f"latent must be [1, C, h, w], got shape {tuple(lat.shape)}")
    b, c, h, w = (int(x) for x in lat.shape)
    if min(b, c, h, w) < 1:
        raise InvalidInputError(f"latent has an empty dimension: shape {tuple(lat.shape)}")
    if c > MAX_LATENT_CHANNELS or h > MAX_LATENT_SIDE or w > MAX_LATENT_SIDE or h * w > MAX_LATENT_HW:
        raise InvalidInputError(f"latent {tuple(lat.shape)} is too large (h*w at most {MAX_LATENT_HW}, "
                                f"sides at most {MAX_LATENT_SIDE}, channels at most {MAX_LATENT_CHANNELS})")
    lat = lat[:1].float()
    if not bool(torch.isfinite(lat).all()):
        raise InvalidInputError("latent holds NaN or Inf values")
    return lat


def decode_request(host: Host, req: DecodeRequest) -> dict:
    import torch

    from .. import tiled_vae
    from ..tiled_vae.vae import check_latent, decode, load_vae, to_pil
    scaled = req.scaled
    factor = None
    if req.tile_size and not (MIN_TILE_PX <= req.tile_size <= MAX_TILE_PX):
        raise InvalidInputError(f"tile_size must be {MIN_TILE_PX}..{MAX_TILE_PX} px (or null for automatic), "
                                f"got {req.tile_size}")
    device = check_device(req.device) if req.device else ("cuda" if torch.cuda.is_available() else "cpu")
    vae_path = host.resolve(req.vae)
    if req.latent_safetensors_b64:
        lat, scaled, factor = _latent_from_b64(req.latent_safetensors_b64)
    elif req.latent is not None:
        lat = _latent_from_list(req.latent)
    else:
        raise InvalidInputError("give 'latent' or 'latent_safetensors_b64'")
    lat = bound_latent(lat)   # read_latent has already refused a scaling factor that is not a finite number > 0
    if req.tile_size and not req.full:
        t = max(1, req.tile_size // 8)
        n = math.ceil(lat.shape[2] / t) * math.ceil(lat.shape[3] / t)
        if n > MAX_TILES:
            raise InvalidInputError(f"tile_size {req.tile_size} cuts this {lat.shape[3] * 8}x{lat.shape[2] * 8} image "
                                    f"into {n} tiles (at most {MAX_TILES}); use a larger tile_size or null")
    vae = load_vae(str(vae_path), device=device)
    check_latent(vae, lat)
    if factor:
        vae.scaling_factor = factor
    cfg = tiled_vae.TiledVAEConfig(tile_px=req.tile_size or None, fast=req.fast)
    plan = "full decode" if req.full else tiled_vae.plan_for(vae.decoder, lat.shape, cfg).describe()
    img = to_pil(decode(vae, lat, cfg, full=req.full, scaled=scaled))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode("ascii"), "plan": plan,
            "width": img.width, "height": img.height}


def register(router: APIRouter, host: Host) -> None:
    @router.post(PATH)
    def vae_decode(req: DecodeRequest) -> dict:
        return decode_request(host, req)
