"""``POST /sdtoolkit/v1/vae/decode``: a latent (base64 safetensors or a nested list) -> PNG (base64), tiled.

Body: ``{"vae": name-or-path, "latent": [[[[...]]]] | "latent_safetensors_b64": "...", "scaled": true,
"tile_size": px | null, "fast": false, "full": false}``. Answer: ``{"image": base64 PNG, "plan": "...",
"width": W, "height": H}``. Errors: 4xx ``{"detail": ...}`` (raised as SdToolkitError, mapped by the app).
"""
from __future__ import annotations

import base64
import io
import os
import tempfile
from typing import Any, List, Optional

from fastapi import APIRouter
from pydantic import BaseModel

from ..errors import InvalidInputError
from ..host import Host

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


def decode_request(host: Host, req: DecodeRequest) -> dict:
    import torch

    from .. import tiled_vae
    from ..tiled_vae.vae import decode, load_vae, read_latent, to_pil
    scaled = req.scaled
    factor = None
    if req.latent_safetensors_b64:
        fd, tmp = tempfile.mkstemp(suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(req.latent_safetensors_b64))
            lat, scaled, factor = read_latent(tmp)
        finally:
            os.unlink(tmp)
    elif req.latent is not None:
        lat = torch.tensor(req.latent, dtype=torch.float32)
        if lat.ndim == 3:
            lat = lat[None]
        if lat.ndim != 4:
            raise InvalidInputError(f"latent must be [1,4,h,w], got shape {tuple(lat.shape)}")
    else:
        raise InvalidInputError("give 'latent' or 'latent_safetensors_b64'")
    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(str(host.resolve(req.vae)), device=device)
    if factor:
        vae.scaling_factor = factor
    cfg = tiled_vae.TiledVAEConfig(tile_px=req.tile_size, fast=req.fast)
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
