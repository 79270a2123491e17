"""``python -m lib_sdtoolkit vae decode|encode ...``: the tiled VAE jobs' flags, derived from their requests.

    vae decode LATENT.safetensors --vae VAE_FILE -o OUT.png [--tile-size PX | --full] [--fast]
    vae encode IMAGE --vae VAE_FILE -o LATENT.safetensors [--tile-size PX | --full] [--fast] [--unscaled]
"""
from __future__ import annotations

from typing import Any

_LATENT_FILE = ("A latent file holds one tensor 'latent' [B, 4, h, w]; its metadata sdtoolkit.latent_scaled says "
                "whether it is multiplied by the model's scaling factor (0.18215 SD1/SD2, 0.13025 SDXL), "
                "sdtoolkit.scaling_factor which.")


def register(subparsers: Any) -> None:
    from .jobs import get
    from .jobs.faces import add_cli

    p = subparsers.add_parser("vae", help="exact tiled VAE decode/encode (bounded memory)")
    sub = p.add_subparsers(dest="vae_command", metavar="decode|encode")
    add_cli(sub, get("vae-decode"), "decode", epilog=_LATENT_FILE)
    add_cli(sub, get("vae-encode"), "encode", epilog=_LATENT_FILE)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
