"""``python -m lib_sdtoolkit vae decode|encode ...``

    vae decode LATENT.safetensors --vae VAE_FILE -o OUT.png [--tile-size PX | --full] [--fast]
    vae encode IMAGE --vae VAE_FILE -o LATENT.safetensors [--tile-size PX | --full] [--fast] [--unscaled]

A latent file holds one tensor ``latent`` [B, 4, h, w]; its metadata ``sdtoolkit.latent_scaled`` says whether it
is multiplied by the model's scaling factor (0.18215 SD1/SD2, 0.13025 SDXL), ``sdtoolkit.scaling_factor`` which.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..errors import InvalidInputError
from ..files import atomic_path, check_output_path

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, metavar="VAE_FILE",
                   help="a VAE file (ldm or diffusers names) or a checkpoint with first_stage_model.* keys")
    p.add_argument("-o", "--output", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tile-size", type=int, metavar="PX", help="tile core size in image pixels (default: from memory)")
    g.add_argument("--full", action="store_true", help="no tiling: run the VAE as is")
    p.add_argument("--fast", action="store_true",
                   help="approximate: estimate GroupNorm statistics from a downscaled pass (no statistics passes)")
    p.add_argument("--budget-mb", type=int, help="memory for checkpoints + one tile (default: from free memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--sdxl", action="store_true", help="the VAE is SDXL's (scaling factor 0.13025)")
    p.add_argument("--scaling-factor", type=float, help="override the latent scaling factor")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("vae", help="exact tiled VAE decode/encode (bounded memory)")
    sub = p.add_subparsers(dest="vae_command", metavar="decode|encode")
    d = sub.add_parser("decode", help="latent file -> PNG")
    d.add_argument("latent", metavar="LATENT.safetensors")
    _common(d)
    d.set_defaults(func=_decode)
    e = sub.add_parser("encode", help="image -> latent file")
    e.add_argument("image", metavar="IMAGE")
    _common(e)
    e.add_argument("--unscaled", action="store_true", help="store the latent without the scaling factor")
    e.set_defaults(func=_encode)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _cfg(args, kind: str):
    from . import TiledVAEConfig
    bar = None
    if not args.quiet and not args.full:
        try:
            from tqdm import tqdm
            bar = tqdm(total=0, unit="tile", desc=f"tiled {kind}", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    if args.tile_size is not None and args.tile_size < 8:
        raise InvalidInputError(f"--tile-size {args.tile_size}: at least 8 pixels")
    log = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    cfg = TiledVAEConfig(tile_px=args.tile_size, fast=args.fast,
                         budget_bytes=args.budget_mb * 2 ** 20 if args.budget_mb else None,
                         progress=progress, log=log)
    return cfg, bar


def _load(args):
    from .vae import load_vae
    return load_vae(args.vae, device=args.device, dtype=_DTYPES[args.dtype], sdxl=True if args.sdxl else None,
                    scaling_factor=args.scaling_factor)


def _decode(args) -> int:
    from .vae import check_latent, decode, read_latent, to_pil
    out = check_output_path(args.output, [args.latent, args.vae], args.overwrite)
    lat, scaled, factor = read_latent(args.latent)
    vae = _load(args)
    check_latent(vae, lat, args.latent)
    if factor and not args.scaling_factor:
        vae.scaling_factor = factor
    cfg, bar = _cfg(args, "decode")
    try:
        img = decode(vae, lat, cfg, full=args.full, scaled=scaled)
    finally:
        if bar is not None:
            bar.close()
    pil = to_pil(img)
    with atomic_path(out, overwrite=args.overwrite) as tmp:
        pil.save(tmp, format="PNG")
    print(f"{out}: {pil.width}x{pil.height} px")
    return 0


def _encode(args) -> int:
    from PIL import Image

    from .vae import encode, from_pil, save_latent
    out = check_output_path(args.output, [args.image, args.vae], args.overwrite)
    try:
        im = Image.open(args.image)
        im.load()
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read the image: {e}", args.image) from None
    x = from_pil(im)
    vae = _load(args)
    cfg, bar = _cfg(args, "encode")
    try:
        lat = encode(vae, x, cfg, full=args.full, scaled=not args.unscaled)
    finally:
        if bar is not None:
            bar.close()
    save_latent(str(out), lat, scaled=not args.unscaled, factor=vae.scaling_factor, overwrite=args.overwrite,
                extra={"sdtoolkit.source_image": str(args.image), "sdtoolkit.vae": str(args.vae)})
    print(f"{out}: latent {tuple(lat.shape)} ({'scaled by ' + repr(vae.scaling_factor) if not args.unscaled else 'unscaled'})")
    return 0
