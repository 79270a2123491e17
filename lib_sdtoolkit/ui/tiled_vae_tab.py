"""Tiled VAE tab: decode a latent file / encode an image with the exact tiled VAE, with progress, and -- where a
full decode fits in memory -- the full decode beside it with the difference (max |d| in 8-bit steps, PSNR)."""
from __future__ import annotations

import html
import logging
import math
import os
import tempfile
import time
from typing import Any, Optional, Tuple

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import Host
from .common import error_html, model_choices, resolve_input

log = logging.getLogger(__name__)

TITLE = "Tiled VAE"
ELEM_ID = "tiled_vae"


def _compare(a, b) -> str:
    import numpy as np
    x = np.asarray(a).astype(np.int16)
    y = np.asarray(b).astype(np.int16)
    d = np.abs(x - y)
    mse = float((d.astype(np.float64) ** 2).mean())
    psnr = "inf" if mse == 0 else f"{10 * math.log10(255 ** 2 / mse):.1f}"
    return f"tiled vs full: max |d| = {int(d.max())}/255, {100 * float((d > 1).mean()):.2f}% pixels off by more than 1, PSNR {psnr} dB"


def run_decode(host: Host, vae_choice: str, vae_path: str, latent_file: Any, tile_px: float, fast: bool,
               compare: bool, device: str, progress: Any = None) -> Tuple[Any, Any, str]:
    """(tiled image, full image or None, report html)."""
    from .. import tiled_vae
    from ..tiled_vae.vae import decode, load_vae, read_latent, to_pil
    try:
        if latent_file is None:
            raise InvalidInputError("upload a latent .safetensors file (one tensor 'latent' [1,4,h,w])")
        lat_path = latent_file if isinstance(latent_file, str) else getattr(latent_file, "name", None)
        vae_file = resolve_input(host, vae_choice, vae_path)
        lat, scaled, factor = read_latent(lat_path)
        vae = load_vae(str(vae_file), device=device)
        if factor:
            vae.scaling_factor = factor
        cfg = tiled_vae.TiledVAEConfig(tile_px=int(tile_px) or None, fast=bool(fast),
                                       progress=_progress_fn(progress, "tiled decode"))
        plan = tiled_vae.plan_for(vae.decoder, lat.shape, cfg)
        t0 = time.perf_counter()
        img = to_pil(decode(vae, lat, cfg, scaled=scaled))
        t_tiled = time.perf_counter() - t0
        lines = [plan.describe(), f"tiled: {t_tiled:.1f} s"]
        full_img = None
        if compare:
            full_plan = tiled_vae.plan_for(vae.decoder, lat.shape, tiled_vae.TiledVAEConfig(budget_bytes=1 << 50,
                                                                                          tile_px=1 << 20))
            need = full_plan.peak_estimate * 2
            have = tiled_vae.memory_budget(device)
            if need <= have:
                t0 = time.perf_counter()
                full_img = to_pil(decode(vae, lat, full=True, scaled=scaled))
                lines += [f"full: {time.perf_counter() - t0:.1f} s", _compare(img, full_img)]
            else:
                lines.append(f"full decode skipped: needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free")
        return img, full_img, "<br>".join(html.escape(s) for s in lines)
    except SdToolkitError as exc:
        return None, None, error_html(exc)
    except Exception as exc:
        log.exception("sdtoolkit: tiled decode failed")
        return None, None, error_html(exc)


def run_encode(host: Host, vae_choice: str, vae_path: str, image: Any, tile_px: float, fast: bool, device: str,
               progress: Any = None) -> Tuple[Optional[str], str]:
    """(path of the written latent file, report html)."""
    from .. import tiled_vae
    from ..tiled_vae.vae import encode, from_pil, load_vae, save_latent
    try:
        if image is None:
            raise InvalidInputError("drop an image first")
        vae_file = resolve_input(host, vae_choice, vae_path)
        vae = load_vae(str(vae_file), device=device)
        x = from_pil(image)
        cfg = tiled_vae.TiledVAEConfig(tile_px=int(tile_px) or None, fast=bool(fast),
                                       progress=_progress_fn(progress, "tiled encode"))
        plan = tiled_vae.plan_for(vae.encoder, x.shape, cfg)
        lat = encode(vae, x, cfg)
        fd, out = tempfile.mkstemp(prefix="latent-", suffix=".safetensors")
        os.close(fd)
        os.unlink(out)
        save_latent(out, lat, True, vae.scaling_factor, extra={"sdtoolkit.vae": str(vae_file)})
        return out, html.escape(plan.describe()) + f"<br>latent {tuple(lat.shape)}, scaled by {vae.scaling_factor}"
    except SdToolkitError as exc:
        return None, error_html(exc)
    except Exception as exc:
        log.exception("sdtoolkit: tiled encode failed")
        return None, error_html(exc)


def _progress_fn(progress: Any, desc: str):
    if progress is None:
        return None

    def cb(done: int, total: int) -> None:
        try:
            progress((done, total), desc=desc)
        except Exception:
            pass
    return cb


def build(host: Host) -> None:
    import torch
    dev_default = "cuda" if torch.cuda.is_available() else "cpu"
    choices = model_choices(host, ("vae", "checkpoint"))
    gr.Markdown("Exact tiled VAE: every GroupNorm uses the statistics of the whole image, so the result equals a "
                "full decode (to float round-off) with bounded memory. Tile size in image pixels; 0 = from free "
                "memory. Fast mode estimates the statistics from a downscaled pass (approximate).",
                elem_classes=["sdtoolkit-hint"])
    with gr.Row():
        vae = gr.Dropdown(label="VAE or checkpoint", choices=choices, value=choices[0] if choices else None,
                          elem_id="sdtoolkit_tiled_vae_model", scale=4)
        vae_path = gr.Textbox(label="...or a name / path", elem_id="sdtoolkit_tiled_vae_path", scale=3)
    with gr.Row():
        tile = gr.Slider(0, 4096, value=0, step=64, label="Tile size (px, 0 = auto)",
                         elem_id="sdtoolkit_tiled_vae_tile")
        fast = gr.Checkbox(False, label="Fast mode (approximate)", elem_id="sdtoolkit_tiled_vae_fast")
        device = gr.Radio(["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"], value=dev_default,
                          label="Device", elem_id="sdtoolkit_tiled_vae_device")
    with gr.Tabs():
        with gr.Tab("Decode"):
            latent = gr.File(label="Latent (.safetensors, tensor 'latent')", file_types=[".safetensors"],
                             elem_id="sdtoolkit_tiled_vae_latent")
            compare = gr.Checkbox(True, label="Also run a full decode beside it (when it fits in memory)",
                                  elem_id="sdtoolkit_tiled_vae_compare")
            dec_btn = gr.Button("Decode", variant="primary", elem_id="sdtoolkit_tiled_vae_decode")
            with gr.Row():
                out_tiled = gr.Image(label="Tiled", type="pil", elem_id="sdtoolkit_tiled_vae_out_tiled")
                out_full = gr.Image(label="Full decode", type="pil", elem_id="sdtoolkit_tiled_vae_out_full")
            dec_report = gr.HTML(elem_id="sdtoolkit_tiled_vae_decode_report")
        with gr.Tab("Encode"):
            image = gr.Image(label="Image (sides multiple of 8)", type="pil", elem_id="sdtoolkit_tiled_vae_image")
            enc_btn = gr.Button("Encode", variant="primary", elem_id="sdtoolkit_tiled_vae_encode")
            enc_file = gr.File(label="Latent file", elem_id="sdtoolkit_tiled_vae_latent_out")
            enc_report = gr.HTML(elem_id="sdtoolkit_tiled_vae_encode_report")

    def _dec(v, vp, lf, t, f, c, d, progress=gr.Progress()):
        return run_decode(host, v, vp, lf, t, f, c, d, progress)

    def _enc(v, vp, im, t, f, d, progress=gr.Progress()):
        return run_encode(host, v, vp, im, t, f, d, progress)

    dec_btn.click(_dec, [vae, vae_path, latent, tile, fast, compare, device], [out_tiled, out_full, dec_report])
    enc_btn.click(_enc, [vae, vae_path, image, tile, fast, device], [enc_file, enc_report])
