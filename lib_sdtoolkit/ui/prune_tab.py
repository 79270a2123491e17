"""Prune & inspect tab: see what a checkpoint holds (components, EMA, junk, dtypes), then prune it or extract one
component (e.g. its VAE as a standalone VAE file)."""
from __future__ import annotations

import html
import logging
from typing import Any, Dict, List, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from .common import (empty_table, error_html, gradio_progress, human_bytes, keep_value, model_choices, model_picker,
                     stop_button, writes)
from .inspect_tab import note_html, picked

log = logging.getLogger(__name__)

TITLE = "Prune & inspect"
ELEM_ID = "prune"
COMPONENT_CHOICES = ["unet", "vae", "text_encoder", "text_encoder_2"]
PLAN_HEADERS = ["component", "keys", "size now", "kept"]


def prune_request(host: Host, values: Dict[str, Any]):
    """The prune job's request from the tab's values (``{field: value}``, plus ``choice``/``path`` of the picker);
    returns ``(request, note)``, ``note`` saying which picker input was used when both hold something."""
    from ..jobs.faces import ui_request
    from ..jobs.maintenance import PruneRequest

    vals = dict(values)
    name, kind, note = picked(vals.pop("choice", None), vals.pop("path", None))
    vals.update(path=name, kind=kind, only=list(vals.get("only") or []) or None,
                bare=True if vals.get("bare") else None)
    return ui_request(PruneRequest, vals), note


def preview(host: Host, choice: Optional[str], path: Optional[str], only: List[str], keep_ema: bool,
            keep_junk: bool, dtype: str) -> Tuple[str, List[List[Any]]]:
    """What the file holds and what pruning would keep (from the header only)."""
    from ..jobs import get
    from ..jobs.faces import ui_request
    from ..jobs.inspect import InspectRequest
    from ..prune import PruneOptions, default_output_name

    try:
        name, kind, note = picked(choice, path)
        report = get("inspect").run(host, ui_request(InspectRequest, {"path": [name], "kind": kind}),
                                   gradio_progress(None))  # a job takes a Progress, never None
        rep = report.to_dict()
        out_name = default_output_name(rep["name"], PruneOptions(dtype=dtype, only=list(only or []) or None))
    except SdToolkitError as exc:
        return error_html(exc), empty_table(PLAN_HEADERS)
    rows: List[List[Any]] = []
    for comp, info in rep.get("components", {}).items():
        kept = "yes" if not only or comp in only else "no"
        rows.append([comp, info["keys"], human_bytes(info["bytes"]), kept])
    if rep["ema"]["keys"]:
        rows.append(["ema", rep["ema"]["keys"], human_bytes(rep["ema"]["bytes"]),
                     "yes" if keep_ema and (not only or "unet" in only) else "no"])
    if rep["junk"]:
        rows.append(["junk", len(rep["junk"]), human_bytes(rep["junk_bytes"]), "yes" if keep_junk and not only else "no"])
    summary = (note_html(note) +
               f'<div class="sdtoolkit-ok"><b>{html.escape(rep["name"])}</b>: {html.escape(rep["architecture"])}, '
               f'{human_bytes(rep["file_size"])}; pruned to fp16 about {human_bytes(rep["pruned_fp16_bytes"])}; '
               f'CLIP position_ids {html.escape(str(rep["position_ids"]))}; a blank output name gives '
               f'<code>{html.escape(out_name)}</code> with these options</div>'
               f'<pre class="sdtoolkit-mono">{html.escape(report.summary())}</pre>')
    return summary, rows


def run_prune(host: Host, values: Dict[str, Any], progress: Any = None) -> Tuple[str, Any]:
    """Click handler: (status html, result json). ``values``: the prune request's fields, and ``choice``/``path``
    of the picker."""
    from ..jobs import get

    try:
        req, note = prune_request(host, values)
        rep = get("prune").run(host, req, gradio_progress(progress, stop_key="prune"))
        res = rep.to_dict()
    except SdToolkitError as exc:
        return error_html(exc), None
    except Exception as exc:  # a bug: show it rather than a silent spinner
        log.exception("sdtoolkit: prune failed")
        return error_html(exc), None
    if not res["written"]:
        return note_html(note) + note_html(res["note"] or "nothing would change; no file written"), res
    saved = res["in_file_size"] - res["out_file_size"]
    change = f"saved {human_bytes(saved)}" if saved >= 0 else f"{human_bytes(-saved)} larger"
    msg = (note_html(note) +
           f'<div class="sdtoolkit-ok">Wrote <b>{html.escape(res["name"])}</b> ({html.escape(res["kind"])}): '
           f'{human_bytes(res["out_file_size"])}, before {human_bytes(res["in_file_size"])}, {change}; dropped '
           f'{html.escape(str(res["dropped"] or "nothing"))}</div>')
    return msg, res


def build(host: Host) -> None:
    model, refresh_btn, path = model_picker(host, ("checkpoint", "vae"), "prune")
    with gr.Row():
        only = gr.CheckboxGroup(COMPONENT_CHOICES, label="Keep only (none ticked: every component; only vae: a "
                                                         "standalone VAE file)", elem_id="sdtoolkit_prune_only")
        dtype = gr.Radio(["fp16", "bf16", "fp32", "keep"], value="fp16", label="Floating tensors become",
                         elem_id="sdtoolkit_prune_dtype")
    with gr.Row():
        keep_ema = gr.Checkbox(False, label="Keep EMA", elem_id="sdtoolkit_prune_keep_ema")
        keep_junk = gr.Checkbox(False, label="Keep junk keys", elem_id="sdtoolkit_prune_keep_junk")
        fix_pids = gr.Checkbox(False, label="Fix CLIP position_ids", elem_id="sdtoolkit_prune_fix_pids")
        bare = gr.Checkbox(False, label="Bare keys (strip the component prefix)", elem_id="sdtoolkit_prune_bare")
    inspect_btn = gr.Button("Inspect", elem_id="sdtoolkit_prune_inspect")
    summary = gr.HTML(elem_id="sdtoolkit_prune_summary")
    plan = gr.Dataframe(value=empty_table(PLAN_HEADERS), headers=PLAN_HEADERS, datatype=["str", "number", "str", "str"], interactive=False,
                        elem_id="sdtoolkit_prune_plan", label="What pruning keeps")
    with gr.Row():
        output = gr.Textbox(label="Output file name (written beside the models of its kind; blank: named from the "
                                  "options above when you click Prune)", lines=1,
                            elem_id="sdtoolkit_prune_output", scale=4)
        overwrite = gr.Checkbox(False, label="Overwrite an existing output", elem_id="sdtoolkit_prune_overwrite")
    prune_btn = gr.Button("Prune", variant="primary", elem_id="sdtoolkit_prune_run")
    status = gr.HTML(elem_id="sdtoolkit_prune_status")
    stop_button("prune", status)
    with gr.Accordion("JSON", open=False):
        result_json = gr.JSON(elem_id="sdtoolkit_prune_json")

    def do_refresh(current: str):
        host.refresh(None)
        new = model_choices(host, ("checkpoint", "vae"))
        return gr.update(choices=new, value=keep_value(new, current))

    from ..jobs.faces import bind

    prune_inputs, unpack = bind({"choice": model, "path": path, "only": only, "dtype": dtype, "keep_ema": keep_ema,
                                 "keep_junk": keep_junk, "fix_position_ids": fix_pids, "bare": bare,
                                 "output": output, "overwrite": overwrite})

    def do_prune(progress=gr.Progress(), *values):  # gradio finds gr.Progress only before *values
        vals = unpack(*values)
        msg, res = run_prune(host, vals, progress)
        if not res or not res.get("written"):
            return msg, res, gr.update()
        new = model_choices(host, ("checkpoint", "vae"))  # the new file is listed at once (the job refreshed)
        return msg, res, gr.update(choices=new, value=keep_value(new, vals["choice"]))

    refresh_btn.click(do_refresh, inputs=[model], outputs=[model])
    preview_inputs = [model, path, only, keep_ema, keep_junk, dtype]
    inspect_btn.click(lambda c, p, o, ke, kj, d: preview(host, c, p, o, ke, kj, d),
                      inputs=preview_inputs, outputs=[summary, plan])

    def follow(shown, c, p, o, ke, kj, d):
        """A preview on screen follows the options (the output name it announces is never stale)."""
        if not shown:
            return gr.update(), gr.update()
        return preview(host, c, p, o, ke, kj, d)

    for comp in (only, dtype, keep_ema, keep_junk):
        comp.change(follow, inputs=[summary] + preview_inputs, outputs=[summary, plan])
    writes(prune_btn.click(do_prune, inputs=prune_inputs, outputs=[status, result_json, model]))
