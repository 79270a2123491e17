"""The "ControlNet" tab: upload an image, pick a weight-free preprocessor, see the detected map."""
from __future__ import annotations

from typing import Any

import gradio as gr

TITLE = "ControlNet"
ELEM_ID = "controlnet"


def build(host: Any) -> None:
    from ..controlnet import preprocessors as P
    from ..controlnet.compat import external_controlnet
    from ..controlnet.registry import model_titles

    reason = external_controlnet(getattr(host, "settings", None))
    if reason:
        gr.Markdown(f"**SD Toolkit's ControlNet units and `/controlnet` API are off:** {reason}. "
                    "The preprocessor preview below still works.", elem_classes=["sdtoolkit-warning"])
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Input image", type="numpy", elem_id="sdtoolkit_cn_image")
            module = gr.Dropdown(P.module_list(), value="canny", label="Preprocessor", elem_id="sdtoolkit_cn_module")
            res = gr.Slider(64, 2048, value=512, step=8, label="Resolution (-1 = default)")
            with gr.Row():
                a = gr.Number(value=-1, label="Threshold A (-1 = default)")
                b = gr.Number(value=-1, label="Threshold B (-1 = default)")
            run = gr.Button("Run preprocessor", variant="primary", elem_id="sdtoolkit_cn_run")
        with gr.Column():
            out = gr.Image(label="Detected map", interactive=False, elem_id="sdtoolkit_cn_map")
            info = gr.Markdown()
    with gr.Accordion("Unavailable preprocessors and installed models", open=False):
        gr.Markdown("\n".join(f"- `{n}`: {why}" for n, why in P.UNAVAILABLE.items()))
        models = gr.Markdown()
        gr.Button("List ControlNet models").click(
            lambda: "\n".join(f"- {t}" for t in model_titles(host)) or "(no ControlNet models found)",
            outputs=[models])

    def detect(img, mod, r, ta, tb):
        if img is None:
            return None, "**Upload an image first.**"
        try:
            m = P.run_preprocessor(mod, img, r, ta, tb)
        except Exception as e:  # SdToolkitError: clear message in the UI
            return None, f"**Error:** {e}"
        pre = P.get_preprocessor(mod)
        note = f" ({pre.note})" if pre is not None and pre.note else ""
        return m, f"{mod}: {m.shape[1]}x{m.shape[0]}{note}"

    run.click(detect, inputs=[image, module, res, a, b], outputs=[out, info])
