"""``POST /sdtoolkit/v1/vae/decode`` and ``/vae/encode``: the tiled VAE jobs; bodies derived from their requests.

Decode body: ``{"vae": name-or-path, "latent": [[[[...]]]] | "latent_safetensors_b64": "...", "scaled": true,
"tile_size": px | null, "fast": false, "full": false, "device": null, "dtype": "fp32", "sdxl": false,
"scaling_factor": null}``. Answer: ``{"image": base64 PNG, "plan": "...", "width": W, "height": H}``.

Encode body: ``{"vae": ..., "image_b64": base64 image (sides multiple of 8), "unscaled": false, ...}`` (the same
options). Answer: ``{"latent_safetensors_b64": "...", "shape": [1, 4, h, w], "scaled": true,
"scaling_factor": 0.18215, "plan": "..."}``.

An unknown body field is a 422; errors are 4xx ``{"detail": ...}`` (SdToolkitError, mapped by the app).
"""
from __future__ import annotations

from fastapi import APIRouter

from ..host import Host
from ..jobs import get as get_job
from ..jobs.faces import add_route

PATH = "/sdtoolkit/v1/vae/decode"
ENCODE_PATH = "/sdtoolkit/v1/vae/encode"


def register(router: APIRouter, host: Host) -> None:
    add_route(router, host, get_job("vae-decode"), PATH)
    add_route(router, host, get_job("vae-encode"), ENCODE_PATH)
