"""Tiled VAE tab: decode a latent file / encode an image with the exact tiled VAE (the ``vae-decode`` /
``vae-encode`` jobs), with progress, and -- where a full decode fits in memory -- the full decode beside it with
the difference (max |d| in 8-bit steps, PSNR).

The tab sends the data itself (the uploaded latent file's bytes, the image as PNG), as the API does: the jobs read
no client path on a host that is not trusted."""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import Host
from .common import (error_html, gradio_progress, model_choices, register_picker, register_sample, sample_file,
                     stop_button)

log = logging.getLogger(__name__)

TITLE = "Tiled VAE"
ELEM_ID = "tiled_vae"


def _vae_name(values: Dict[str, Any]) -> str:
    """The VAE the picker names: the path box while it holds text (picking in the dropdown clears it), else the
    dropdown's ``[vae] name`` / ``[checkpoint] name``; the report says which (``values["_note"]``)."""
    path = (values.pop("vae_path", None) or "").strip()
    choice = values.pop("vae_choice", None) or ""
    if not path and not choice:
        raise InvalidInputError("pick a VAE or checkpoint, or type its name / path first")
    from .inspect_tab import picked

    name, _, note = picked(choice, path)
    values["_note"] = note
    return name


def decode_request(values: Dict[str, Any]) -> Any:
    """The ``vae-decode`` request from the tab's values (``latent_file``: the upload, sent as its bytes)."""
    from ..jobs.faces import ui_request
    from ..jobs.tiled_vae import VaeDecodeRequest

    vals = dict(values)
    vae = _vae_name(vals)
    vals.pop("_note", None)
    upload = vals.pop("latent_file", None)
    if upload is None:
        raise InvalidInputError("upload a latent .safetensors file (one tensor 'latent' [1,4,h,w])")
    path = upload if isinstance(upload, str) else getattr(upload, "name", None)
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return ui_request(VaeDecodeRequest, vals, vae=vae, latent_safetensors_b64=data)


def encode_request(values: Dict[str, Any]) -> Any:
    """The ``vae-encode`` request from the tab's values (the PIL image sent as PNG, lossless)."""
    from ..jobs.faces import ui_request
    from ..jobs.tiled_vae import VaeEncodeRequest

    vals = dict(values)
    vae = _vae_name(vals)
    vals.pop("_note", None)
    image = vals.pop("image", None)
    if image is None:
        raise InvalidInputError("drop an image first")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ui_request(VaeEncodeRequest, vals, vae=vae, image_b64=base64.b64encode(buf.getvalue()).decode("ascii"))


def _note(values: Dict[str, Any]) -> str:
    from .inspect_tab import note_html, picked

    try:
        return note_html(picked(values.get("vae_choice"), values.get("vae_path"))[2])
    except SdToolkitError:
        return ""


def run_decode(host: Host, values: Dict[str, Any], progress: Any = None) -> Tuple[Any, Any, str]:
    """Click handler: (tiled image, full image or None, report html)."""
    from ..jobs import get

    try:
        report = get("vae-decode").run(host, decode_request(values), gradio_progress(progress, stop_key="tiled_vae"))
        return report.image, report.full_image, _note(values) + "<br>".join(html.escape(s) for s in report.lines())
    except SdToolkitError as exc:
        return None, None, error_html(exc)
    except Exception as exc:
        log.exception("sdtoolkit: tiled decode failed")
        return None, None, error_html(exc)


def run_encode(host: Host, values: Dict[str, Any], progress: Any = None) -> Tuple[Optional[str], str]:
    """Click handler: (path of the latent file to download, report html)."""
    from ..jobs import get

    try:
        report = get("vae-encode").run(host, encode_request(values), gradio_progress(progress, stop_key="tiled_vae"))
        fd, out = tempfile.mkstemp(prefix="latent-", suffix=".safetensors")
        with os.fdopen(fd, "wb") as f:
            f.write(report.data)
        how = f"scaled by {report.scaling_factor}" if report.scaled else "unscaled"
        return out, (_note(values) + html.escape(report.plan) + f"<br>latent {tuple(report.shape)}, {how}; it is "
                     f"the Decode tab's latent now")
    except SdToolkitError as exc:
        return None, error_html(exc)
    except Exception as exc:
        log.exception("sdtoolkit: tiled encode failed")
        return None, error_html(exc)


def build(host: Host) -> None:
    import torch

    from ..jobs.faces import bind

    dev_default = "cuda" if torch.cuda.is_available() else "cpu"
    choices = model_choices(host, ("vae", "checkpoint"))
    gr.Markdown("Exact tiled VAE: every GroupNorm uses the statistics of the whole image, so the result equals a "
                "full decode (to float round-off) with bounded memory. Tile size in image pixels; 0 = from free "
                "memory. Fast mode estimates the statistics from a downscaled pass (approximate).",
                elem_classes=["sdtoolkit-hint"])
    with gr.Row():
        vae = register_picker(gr.Dropdown(label="VAE or checkpoint", choices=choices,
                                          value=choices[0] if choices else None,
                                          elem_id="sdtoolkit_tiled_vae_model", scale=4), ("vae", "checkpoint"),
                              tagged=True)
        vae_path = gr.Textbox(label="...or a name / path (used while it holds text; picking in the list clears it)",
                              elem_id="sdtoolkit_tiled_vae_path", scale=3)
    if hasattr(vae, "select"):
        vae.select(lambda: "", inputs=[], outputs=[vae_path], queue=False)
    with gr.Row():
        tile = gr.Slider(0, 4096, value=0, step=64, label="Tile size (px, 0 = auto)",
                         elem_id="sdtoolkit_tiled_vae_tile")
        fast = gr.Checkbox(False, label="Fast mode (approximate)", elem_id="sdtoolkit_tiled_vae_fast")
        device = gr.Radio(["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"], value=dev_default,
                          label="Device", elem_id="sdtoolkit_tiled_vae_device")
    with gr.Tabs():
        with gr.Tab("Decode"):
            latent = gr.File(label="Latent (.safetensors, tensor 'latent'; the sample library's, or the last "
                                   "encoded one)", file_types=[".safetensors"], value=sample_file(host, "latent"),
                             elem_id="sdtoolkit_tiled_vae_latent")
            register_sample(latent, "latent")
            compare = gr.Checkbox(True, label="Also run a full decode beside it (when it fits in memory)",
                                  elem_id="sdtoolkit_tiled_vae_compare")
            dec_btn = gr.Button("Decode", variant="primary", elem_id="sdtoolkit_tiled_vae_decode")
            with gr.Row():
                out_tiled = gr.Image(label="Tiled", type="pil", elem_id="sdtoolkit_tiled_vae_out_tiled")
                out_full = gr.Image(label="Full decode", type="pil", elem_id="sdtoolkit_tiled_vae_out_full")
            dec_report = gr.HTML(elem_id="sdtoolkit_tiled_vae_decode_report")
        with gr.Tab("Encode"):
            image = gr.Image(label="Image (sides multiple of 8)", type="pil", value=sample_file(host, "image"),
                             elem_id="sdtoolkit_tiled_vae_image")
            register_sample(image, "image")
            enc_btn = gr.Button("Encode", variant="primary", elem_id="sdtoolkit_tiled_vae_encode")
            enc_file = gr.File(label="Latent file", elem_id="sdtoolkit_tiled_vae_latent_out")
            enc_report = gr.HTML(elem_id="sdtoolkit_tiled_vae_encode_report")

    status = gr.HTML(elem_id="sdtoolkit_tiled_vae_status")
    stop_button("tiled_vae", status)
    common = {"vae_choice": vae, "vae_path": vae_path, "tile_size": tile, "fast": fast, "device": device}
    dec_inputs, dec_values = bind({**common, "latent_file": latent, "compare": compare})
    enc_inputs, enc_values = bind({**common, "image": image})

    def _dec(progress=gr.Progress(), *values):  # gradio looks for gr.Progress only before *values
        return run_decode(host, dec_values(*values), progress)

    def _enc(progress=gr.Progress(), *values):
        out, report = run_encode(host, enc_values(*values), progress)
        # the encoded latent becomes the Decode tab's input: encode -> decode needs no download / upload
        return out, report, (out if out is not None else gr.update())

    dec_btn.click(_dec, dec_inputs, [out_tiled, out_full, dec_report])
    enc_btn.click(_enc, enc_inputs, [enc_file, enc_report, latent])
