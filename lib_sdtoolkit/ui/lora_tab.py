"""LoRA tools tab: extract a LoRA from two checkpoints, bake LoRAs into a checkpoint, inspect a LoRA file.

Each button runs its LoRA job (``jobs.lora.ACTIONS``) with the tab's values as ``{field: value}`` (the fields of
the job's request, the same as the API body); the tab only translates what a widget cannot say directly and shows
the report. Refresh re-reads the model lists; a job that writes a file refreshes the lists it adds to.
"""
from __future__ import annotations

import html
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from . import lora_convert_panel
from .common import error_html, gradio_progress, keep_value

log = logging.getLogger(__name__)

TITLE = "LoRA tools"
ELEM_ID = "lora"


def _names(host: Host, kind: str) -> List[str]:
    return [host.display_name(p, kind) for p in host.list_models(kind)]


def lora_request(action: str, values: Mapping[str, Any]) -> Any:
    """The job's request from the tab's values. Translations: a conv rank of 0 means "attention only" (no
    ``conv_rank``); the bake list is one ``NAME[:MULT]`` per line."""
    from ..jobs.faces import ui_request
    from ..jobs.lora import ACTIONS

    vals = dict(values)
    if action == "extract" and vals.get("conv_rank") in (0, 0.0, None, ""):
        vals.pop("conv_rank", None)
    if action == "bake" and isinstance(vals.get("loras"), str):
        vals["loras"] = [line.strip() for line in vals["loras"].splitlines() if line.strip()]
    return ui_request(ACTIONS[action].request, vals)


def run_action(host: Host, action: str, values: Mapping[str, Any],
               progress: Any = None) -> Tuple[str, Optional[Dict[str, Any]]]:
    """Click handler of every LoRA action: (status html, report dict or None on error)."""
    from ..jobs.lora import ACTIONS

    try:
        report = ACTIONS[action].run(host, lora_request(action, values), gradio_progress(progress))
    except SdToolkitError as exc:
        return error_html(exc), None
    except Exception as exc:  # noqa: BLE001 - shown in the tab, traceback in the log
        log.exception("sdtoolkit: LoRA %s failed", action)
        return error_html(exc), None
    text = html.escape(report.summary())
    if action == "inspect":
        return f'<pre class="sdtoolkit-mono">{text}</pre>', report.to_dict()
    return f'<div class="sdtoolkit-ok">{text.replace(chr(10), "<br>")}</div>', report.to_dict()


def _updates(host: Host, kind: str, *current: Optional[str]) -> List[Any]:
    names = _names(host, kind)
    return [gr.update(choices=names, value=keep_value(names, c) if c else None) for c in current]


def build(host: Host) -> None:
    from ..jobs.faces import bind

    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="sdtoolkit_lora_refresh", elem_classes=["sdtoolkit-tool"])
    with gr.Tab("Inspect", elem_id="sdtoolkit_lora_inspect_tab"):
        lora = gr.Dropdown(choices=_names(host, "lora"), label="LoRA", elem_id="sdtoolkit_lora_inspect_file")
        btn = gr.Button("Inspect", elem_id="sdtoolkit_lora_inspect_btn")
        out = gr.HTML()
    with gr.Tab("Extract", elem_id="sdtoolkit_lora_extract_tab"):
        ck = _names(host, "checkpoint")
        tuned = gr.Dropdown(choices=ck, label="Tuned checkpoint", elem_id="sdtoolkit_lora_tuned")
        base = gr.Dropdown(choices=ck, label="Base checkpoint", elem_id="sdtoolkit_lora_base")
        with gr.Row():
            rank = gr.Number(value=32, label="Rank", precision=0)
            conv_rank = gr.Number(value=0, label="Conv rank (0 = attention only)", precision=0)
            clamp = gr.Number(value=0.99, label="Clamp quantile (1 = off)")
            device = gr.Dropdown(choices=["cpu", "cuda"], value="cpu", label="Device")
            dtype = gr.Dropdown(choices=["fp16", "bf16", "fp32"], value="fp16", label="Dtype",
                                elem_id="sdtoolkit_lora_ex_dtype")
        output = gr.Textbox(label="Output file name", value="extracted.safetensors", elem_id="sdtoolkit_lora_ex_out")
        overwrite = gr.Checkbox(label="Overwrite", value=False)
        btn2 = gr.Button("Extract", variant="primary", elem_id="sdtoolkit_lora_extract_btn")
        res2 = gr.HTML()
    with gr.Tab("Bake", elem_id="sdtoolkit_lora_bake_tab"):
        ckpt = gr.Dropdown(choices=_names(host, "checkpoint"), label="Checkpoint", elem_id="sdtoolkit_lora_bake_ckpt")
        loras = gr.Textbox(lines=3, label="LoRAs, one per line: NAME[:MULT]", elem_id="sdtoolkit_lora_bake_list")
        output3 = gr.Textbox(label="Output file name", value="baked.safetensors")
        overwrite3 = gr.Checkbox(label="Overwrite", value=False)
        btn3 = gr.Button("Bake", variant="primary", elem_id="sdtoolkit_lora_bake_btn")
        res3 = gr.HTML()
    lora_convert_panel.build(host)

    def do_refresh(lo, t, b, c):
        host.refresh("lora")
        host.refresh("checkpoint")
        return tuple(_updates(host, "lora", lo) + _updates(host, "checkpoint", t, b, c))

    refresh.click(do_refresh, inputs=[lora, tuned, base, ckpt], outputs=[lora, tuned, base, ckpt])

    btn.click(lambda n: run_action(host, "inspect", {"lora": n or ""})[0], inputs=[lora], outputs=[out])

    ex_inputs, ex_values = bind({"tuned": tuned, "base": base, "rank": rank, "conv_rank": conv_rank,
                                 "clamp_quantile": clamp, "device": device, "dtype": dtype, "output": output,
                                 "overwrite": overwrite})

    # gradio finds a gr.Progress default only among the positional parameters before ``*values``
    def do_extract(progress=gr.Progress(), lo=None, *values):
        status, rep = run_action(host, "extract", ex_values(*values), progress)
        return (status, *_updates(host, "lora", rep["name"] if rep else lo))

    btn2.click(do_extract, inputs=[lora] + ex_inputs, outputs=[res2, lora])

    bk_inputs, bk_values = bind({"checkpoint": ckpt, "loras": loras, "output": output3, "overwrite": overwrite3})

    def do_bake(progress=gr.Progress(), t=None, b=None, *values):
        status, rep = run_action(host, "bake", bk_values(*values), progress)
        return (status, *_updates(host, "checkpoint", t, b, values[0]))

    btn3.click(do_bake, inputs=[tuned, base] + bk_inputs, outputs=[res3, tuned, base, ckpt])
