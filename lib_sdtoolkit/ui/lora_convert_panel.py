"""The Convert panel of the LoRA tools tab: a LoRA file under another naming (the ``lora-convert`` job).

:func:`build` adds one ``Convert`` tab inside the LoRA tab (``ui.lora_tab`` calls it); :func:`run_convert` is the
click handler, taking the panel's values as ``{field: value}`` (the request's fields, as the API body).
"""
from __future__ import annotations

import html
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from .common import error_html, gradio_progress, keep_value

log = logging.getLogger(__name__)


def _names(host: Host) -> List[str]:
    return [host.display_name(p, "lora") for p in host.list_models("lora")]


def run_convert(host: Host, values: Mapping[str, Any], progress: Any = None
                ) -> Tuple[str, Optional[Dict[str, Any]]]:
    """(status html, report dict or None on error)."""
    from ..jobs.faces import ui_request
    from ..jobs.lora_convert import SPEC

    try:
        report = SPEC.run(host, ui_request(SPEC.request, values), gradio_progress(progress))
    except SdToolkitError as exc:
        return error_html(exc), None
    except Exception as exc:  # noqa: BLE001 - shown in the panel, traceback in the log
        log.exception("sdtoolkit: LoRA convert failed")
        return error_html(exc), None
    text = html.escape(report.summary())
    return f'<div class="sdtoolkit-ok">{text.replace(chr(10), "<br>")}</div>', report.to_dict()


def build(host: Host) -> None:
    """The Convert tab (inside the LoRA tools tab's gr.Tabs context)."""
    from ..jobs.faces import bind
    from ..jobs.lora_convert import NAMINGS

    with gr.Tab("Convert", elem_id="sdtoolkit_lora_convert_tab"):
        with gr.Row():
            lora = gr.Dropdown(choices=_names(host), label="LoRA", elem_id="sdtoolkit_lora_convert_file")
            refresh = gr.Button("Refresh", elem_id="sdtoolkit_lora_convert_refresh", elem_classes=["sdtoolkit-tool"])
        to = gr.Radio(choices=list(NAMINGS), value="kohya", label="Write as", elem_id="sdtoolkit_lora_convert_to")
        output = gr.Textbox(label="Output file name", value="converted.safetensors",
                            elem_id="sdtoolkit_lora_convert_out")
        overwrite = gr.Checkbox(label="Overwrite", value=False)
        btn = gr.Button("Convert", variant="primary", elem_id="sdtoolkit_lora_convert_btn")
        res = gr.HTML()

    def do_refresh(current):
        host.refresh("lora")
        names = _names(host)
        return gr.update(choices=names, value=keep_value(names, current) if current else None)

    refresh.click(do_refresh, inputs=[lora], outputs=[lora])
    inputs, values = bind({"lora": lora, "to": to, "output": output, "overwrite": overwrite})

    def do_convert(progress=gr.Progress(), *vals):
        status, _ = run_convert(host, values(*vals), progress)
        names = _names(host)
        return status, gr.update(choices=names, value=keep_value(names, vals[0]) if vals[0] else None)

    btn.click(do_convert, inputs=inputs, outputs=[res, lora])


__all__ = ["build", "run_convert"]
