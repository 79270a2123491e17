"""Prune & inspect tab: see what a checkpoint holds (components, EMA, junk, dtypes), then prune it or extract one
component (e.g. its VAE as a standalone VAE file)."""
from __future__ import annotations

import html
import logging
from typing import Any, List, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from .common import (empty_table, error_html, human_bytes, keep_value, model_choices, model_picker, parse_choice,
                     resolve_input)

log = logging.getLogger(__name__)

TITLE = "Prune & inspect"
ELEM_ID = "prune"
COMPONENT_CHOICES = ["unet", "vae", "text_encoder", "text_encoder_2"]
PLAN_HEADERS = ["component", "keys", "size now", "kept"]


def _default_output(name: str, only: List[str], dtype: str) -> str:
    import os

    stem = os.path.splitext(os.path.basename(name))[0]
    if only == ["vae"]:
        return f"{stem}.vae.safetensors"
    suffix = "-" + "-".join(only) if only else ""
    return f"{stem}{suffix}-pruned-{dtype}.safetensors"


def preview(host: Host, choice: Optional[str], path: Optional[str], only: List[str], keep_ema: bool,
            keep_junk: bool, dtype: str) -> Tuple[str, List[List[Any]], Any]:
    """What the file holds and what pruning would keep (from the header only)."""
    from ..inspect import format_report, inspect_file

    try:
        target = resolve_input(host, choice, path)
        rep = inspect_file(target)
    except SdToolkitError as exc:
        return error_html(exc), empty_table(PLAN_HEADERS), gr.update()
    rows: List[List[Any]] = []
    for comp, info in rep.get("components", {}).items():
        kept = "yes" if not only or comp in only else "no"
        rows.append([comp, info["keys"], human_bytes(info["bytes"]), kept])
    if rep["ema"]["keys"]:
        rows.append(["ema", rep["ema"]["keys"], human_bytes(rep["ema"]["bytes"]),
                     "yes" if keep_ema and (not only or "unet" in only) else "no"])
    if rep["junk"]:
        rows.append(["junk", len(rep["junk"]), human_bytes(rep["junk_bytes"]), "yes" if keep_junk and not only else "no"])
    name = host.display_name(target)
    summary = (f'<div class="sdtoolkit-ok"><b>{html.escape(name)}</b>: {html.escape(rep["architecture"])}, '
               f'{human_bytes(rep["file_size"])}; pruned to fp16 about {human_bytes(rep["pruned_fp16_bytes"])}; '
               f'CLIP position_ids {html.escape(str(rep["position_ids"]))}</div>'
               f'<pre class="sdtoolkit-mono">{html.escape(format_report(rep))}</pre>')
    return summary, rows, gr.update(value=_default_output(name, only or [], dtype))


def run_prune(host: Host, choice: Optional[str], path: Optional[str], only: List[str], dtype: str, keep_ema: bool,
              keep_junk: bool, fix_pids: bool, bare: bool, output: str, overwrite: bool,
              progress: Any = None) -> Tuple[str, Any]:
    from ..prune import prune_for_host

    try:
        if path and path.strip():
            src_name, kind = path.strip(), None
        else:
            kind, src_name = parse_choice(choice or "")
        body = {"path": src_name, "kind": kind, "output": output, "dtype": dtype, "keep_ema": keep_ema,
                "keep_junk": keep_junk, "fix_position_ids": fix_pids, "only": only or None,
                "bare": True if bare else None, "overwrite": overwrite}
        tick = (lambda d, t: progress(d / t if t else 1.0, desc="pruning")) if progress is not None else None
        res = prune_for_host(host, body, progress=tick)
    except SdToolkitError as exc:
        return error_html(exc), None
    except Exception as exc:  # a bug: show it rather than a silent spinner
        log.exception("sdtoolkit: prune failed")
        return error_html(exc), None
    saved = res["in_file_size"] - res["out_file_size"]
    msg = (f'<div class="sdtoolkit-ok">Wrote <b>{html.escape(res["name"])}</b> ({html.escape(res["kind"])}): '
           f'{human_bytes(res["out_file_size"])}, before {human_bytes(res["in_file_size"])}, saved '
           f'{human_bytes(saved)}; dropped {html.escape(str(res["dropped"] or "nothing"))}</div>')
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
        output = gr.Textbox(label="Output file name (written beside the models of its kind)", lines=1,
                            elem_id="sdtoolkit_prune_output", scale=4)
        overwrite = gr.Checkbox(False, label="Overwrite an existing output", elem_id="sdtoolkit_prune_overwrite")
    prune_btn = gr.Button("Prune", variant="primary", elem_id="sdtoolkit_prune_run")
    status = gr.HTML(elem_id="sdtoolkit_prune_status")
    with gr.Accordion("JSON", open=False):
        result_json = gr.JSON(elem_id="sdtoolkit_prune_json")

    def do_refresh(current: str):
        host.refresh(None)
        new = model_choices(host, ("checkpoint", "vae"))
        return gr.update(choices=new, value=keep_value(new, current))

    def do_prune(c, p, o, d, ke, kj, fp, b, out, ow, progress=gr.Progress()):
        return run_prune(host, c, p, o, d, ke, kj, fp, b, out, ow, progress)

    refresh_btn.click(do_refresh, inputs=[model], outputs=[model])
    inspect_btn.click(lambda c, p, o, ke, kj, d: preview(host, c, p, o, ke, kj, d),
                      inputs=[model, path, only, keep_ema, keep_junk, dtype], outputs=[summary, plan, output])
    prune_btn.click(do_prune, inputs=[model, path, only, dtype, keep_ema, keep_junk, fix_pids, bare, output,
                                      overwrite], outputs=[status, result_json])
