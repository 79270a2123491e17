"""The "ControlNet" tab: upload an image, pick a weight-free preprocessor, see the detected map (the
``controlnet-detect`` job); list the installed models (the ``controlnet-models`` job)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import gradio as gr

TITLE = "ControlNet"
ELEM_ID = "controlnet"


def run_detect(host: Any, values: Dict[str, Any], progress: Any = None) -> Tuple[Any, str]:
    """Click handler: (detected map or None, message). ``values``: ``{field: value}`` of the job's request, the
    image as the array gradio gives."""
    from ..jobs import get
    from ..jobs.faces import error_text, ui_request
    from ..jobs.controlnet import DetectRequest
    from .common import gradio_progress

    vals = dict(values)
    img = vals.pop("image", None)
    if img is None:
        return None, "**Upload an image first.**"
    try:
        report = get("controlnet-detect").run(host, ui_request(DetectRequest, vals, images=[img]),
                                              gradio_progress(progress))
    except Exception as e:  # noqa: BLE001 - SdToolkitError: its message; anything else: its type too
        return None, f"**Error:** {error_text(e)}"
    return report.maps[0], report.summary()


def list_models(host: Any) -> str:
    from ..jobs import run

    titles = run("controlnet-models", host, {"update": True}).model_list[1:]
    return "\n".join(f"- {t}" for t in titles) or "(no ControlNet models found)"


def build(host: Any) -> None:
    from ..controlnet import preprocessors as P
    from ..controlnet.compat import external_controlnet
    from ..jobs.faces import bind

    reason = external_controlnet(getattr(host, "settings", None))
    if reason:
        gr.Markdown(f"**SD Toolkit's ControlNet units and `/controlnet` API are off:** {reason}. "
                    "The preprocessor preview below still works.", elem_classes=["sdtoolkit-warning"])
    with gr.Row():
        with gr.Column():
            from .common import register_sample, sample_file
            image = register_sample(gr.Image(label="Input image", type="numpy", value=sample_file(host, "image"), elem_id="sdtoolkit_cn_image"), "image")
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
        gr.Button("List ControlNet models").click(lambda: list_models(host), outputs=[models])

    inputs, unpack = bind({"image": image, "module": module, "resolution": res, "threshold_a": a,
                           "threshold_b": b})

    def detect(progress=gr.Progress(), *values):  # gradio looks for gr.Progress only before *values
        return run_detect(host, unpack(*values), progress)

    run.click(detect, inputs=inputs, outputs=[out, info])
