"""The "ControlNet" tab: upload an image, pick a weight-free preprocessor, see the detected map (the
``controlnet-detect`` job); list the installed models (the ``controlnet-models`` job).

The sliders take each preprocessor's own labels, ranges, steps and defaults (``preprocessors.SLIDERS``, upstream's
slider data) when the module changes, and hide the ones it does not have; Pixel Perfect computes the resolution
from a target size as sd-webui-controlnet does. :func:`slider_updates` is shared with the WebUI's unit panels."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import gradio as gr

TITLE = "ControlNet"
ELEM_ID = "controlnet"
DEFAULT_MODULE = "canny"


def slider_kwargs(module: str, pixel_perfect: bool = False) -> List[Dict[str, Any]]:
    """gradio kwargs for the (resolution, slider 1, slider 2) of ``module``: its labels, ranges, steps and
    defaults, hidden where it has no such slider (and the resolution under Pixel Perfect)."""
    from ..controlnet import preprocessors as P

    pre = P.get_preprocessor(module)
    sliders = (pre.resolution, pre.slider_1, pre.slider_2) if pre is not None else (None, None, None)
    out = []
    for i, s in enumerate(sliders):
        if s is None:
            out.append({"visible": False})
            continue
        kw = s.gradio_kwargs()
        if i == 0 and pixel_perfect:
            kw["visible"] = False
        out.append(kw)
    return out


def slider_updates(module: str, pixel_perfect: bool = False) -> Tuple[Any, Any, Any]:
    """The three ``gr.update`` a module change sends to the resolution and threshold sliders."""
    return tuple(gr.update(**kw) for kw in slider_kwargs(module, pixel_perfect))  # type: ignore[return-value]


def _slider(kw: Dict[str, Any], **extra: Any) -> Any:
    if "label" not in kw:  # a slider the default module does not have: a placeholder, hidden
        return gr.Slider(0, 1, value=0, label="(unused)", visible=False, **extra)
    return gr.Slider(kw["minimum"], kw["maximum"], value=kw["value"], step=kw["step"], label=kw["label"],
                     visible=kw["visible"], **extra)


def run_detect(host: Any, values: Dict[str, Any], progress: Any = None) -> Tuple[Any, str]:
    """Click handler: (detected map or None, message). ``values``: ``{field: value}`` of the job's request, the
    image as the array gradio gives. Sliders the module does not have are not sent (their default applies)."""
    from ..controlnet import preprocessors as P
    from ..jobs import get
    from ..jobs.faces import error_text, ui_request
    from ..jobs.controlnet import DetectRequest
    from .common import gradio_progress

    vals = dict(values)
    img = vals.pop("image", None)
    if img is None:
        return None, "**Upload an image first.**"
    pre = P.get_preprocessor(vals.get("module"))
    if pre is not None:
        for name, s in (("resolution", pre.resolution), ("threshold_a", pre.slider_1),
                        ("threshold_b", pre.slider_2)):
            if s is None or (name == "resolution" and vals.get("pixel_perfect")):
                vals.pop(name, None)
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
    from ..controlnet.modes import ResizeMode
    from ..jobs.faces import bind

    reason = external_controlnet(getattr(host, "settings", None))
    if reason:
        gr.Markdown(f"**SD Toolkit's ControlNet units and `/controlnet` API are off:** {reason}. "
                    "The preprocessor preview below still works.", elem_classes=["sdtoolkit-warning"])
    res_kw, a_kw, b_kw = slider_kwargs(DEFAULT_MODULE)
    with gr.Row():
        with gr.Column():
            from .common import register_sample, sample_file

            image = register_sample(gr.Image(label="Input image", type="numpy", value=sample_file(host, "image"),
                                             elem_id="sdtoolkit_cn_image"), "image")
            module = gr.Dropdown(P.module_list(), value=DEFAULT_MODULE, label="Preprocessor",
                                 elem_id="sdtoolkit_cn_module")
            pixel_perfect = gr.Checkbox(label="Pixel Perfect", value=False, elem_id="sdtoolkit_cn_pixel_perfect")
            with gr.Row(visible=False) as target:
                width = gr.Number(value=512, precision=0, label="Target width", elem_id="sdtoolkit_cn_width")
                height = gr.Number(value=512, precision=0, label="Target height", elem_id="sdtoolkit_cn_height")
                resize_mode = gr.Radio([m.value for m in ResizeMode], value=ResizeMode.INNER_FIT.value,
                                       label="Resize Mode")
            res = _slider(res_kw, elem_id="sdtoolkit_cn_res")
            with gr.Row():
                a = _slider(a_kw, elem_id="sdtoolkit_cn_a")
                b = _slider(b_kw, elem_id="sdtoolkit_cn_b")
            run = gr.Button("Run preprocessor", variant="primary", elem_id="sdtoolkit_cn_run")
        with gr.Column():
            out = gr.Image(label="Detected map", interactive=False, elem_id="sdtoolkit_cn_map")
            info = gr.Markdown()
    with gr.Accordion("Unavailable preprocessors and installed models", open=False):
        gr.Markdown("\n".join(f"- `{n}`: {why}" for n, why in P.UNAVAILABLE.items()))
        models = gr.Markdown()
        gr.Button("List ControlNet models").click(lambda: list_models(host), outputs=[models])

    module.change(lambda m, pp: slider_updates(m, pp), inputs=[module, pixel_perfect], outputs=[res, a, b])

    def toggle_pixel_perfect(m: str, pp: bool) -> Tuple[Any, Any]:
        kw = slider_kwargs(m, pp)[0]
        return gr.update(visible=bool(pp)), gr.update(visible=kw.get("visible", False))

    pixel_perfect.change(toggle_pixel_perfect, inputs=[module, pixel_perfect], outputs=[target, res])

    inputs, unpack = bind({"image": image, "module": module, "resolution": res, "threshold_a": a,
                           "threshold_b": b, "pixel_perfect": pixel_perfect, "width": width, "height": height,
                           "resize_mode": resize_mode})

    def detect(progress=gr.Progress(), *values):  # gradio looks for gr.Progress only before *values
        return run_detect(host, unpack(*values), progress)

    run.click(detect, inputs=inputs, outputs=[out, info])
