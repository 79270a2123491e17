"""LoRA tools tab: inspect a LoRA file (a table with per-block bars and what would not apply), resize, merge, extract
a LoRA from two checkpoints, bake LoRAs into a checkpoint (with block weights), edit block weights (``lbw=``,
:mod:`.lbw_editor`: the prompt text to copy, or a line for the Bake list).

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
from . import lbw_editor, lora_convert_panel
from .common import error_html, gradio_progress, keep_value, writes

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
    if action == "extract" and vals.get("clamp_quantile") in (1, 1.0, 0, 0.0, None, ""):
        vals.pop("clamp_quantile", None)   # 1 (and the empty box) = no clamp
    if action == "merge" and vals.get("rank") in (0, 0.0, None, ""):
        vals.pop("rank", None)             # 0 = exact
    if action in ("resize", "merge") and vals.get("dtype") in ("keep", "", None):
        vals.pop("dtype", None)
    if action == "resize" and vals.get("dynamic_method") == "fixed":
        vals.pop("dynamic_param", None)
    for key in ("model",):
        if vals.get(key) in ("", None):
            vals.pop(key, None)
    if action in ("bake", "merge") and isinstance(vals.get("loras"), str):
        vals["loras"] = [line.strip() for line in vals["loras"].splitlines() if line.strip()]
    return ui_request(ACTIONS[action].request, vals)


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _counts(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{_esc(k)} ×{_esc(v)}" for k, v in d.items()) or "-"


def inspect_html(rep: Mapping[str, Any]) -> str:
    """The inspect report as tables: the file, per-block layers and Σ‖ΔW‖ with a bar, the modules that would not
    apply (with the reason), the metadata folded away."""
    rows = [("File", f"{_esc(rep['name'])} ({_esc(rep['format'])}, {rep['tensors']} tensors, "
                     f"{rep['file_size'] / 2 ** 20:.2f} MiB)"),
            ("Base model", _esc(rep["base_model"])), ("Types", _counts(rep["types"])),
            ("Ranks", _counts(rep["ranks"])), ("Alphas", _counts(rep["alphas"])),
            ("Targets", _counts(rep["targets"]))]
    if rep.get("dora_layers"):
        rows.append(("DoRA layers", str(rep["dora_layers"])))
    if rep.get("bundled_embeddings"):
        rows.append(("Bundled embeddings", _esc(", ".join(rep["bundled_embeddings"]))))
    if rep.get("control"):
        rows.append(("Control LoRA", _esc(rep["control"]["note"])))
    if rep.get("model"):
        rows.append(("Checked against", f"{_esc(rep['model'])} ({_esc(rep['model_arch'])})"))
    out = ['<div class="sdtoolkit-lora-inspect"><table class="sdtoolkit-table">']
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    blocks = rep.get("blocks") or {}
    if blocks:
        top = max((float(b["norm"]) for b in blocks.values()), default=0.0) or 1.0
        out.append('<table class="sdtoolkit-table sdtoolkit-lora-blocks"><tr><th>Block</th><th>Layers</th>'
                   '<th>Σ‖ΔW‖</th><th style="width:50%"></th></tr>')
        for b, v in blocks.items():
            pct = 100.0 * float(v["norm"]) / top
            out.append(f'<tr><td>{_esc(b)}</td><td>{v["layers"]}</td><td>{float(v["norm"]):.4g}</td>'
                       f'<td><div class="sdtoolkit-bar" style="width:{pct:.1f}%;min-width:1px;height:0.8em;'
                       f'background:var(--color-accent, #f97316)" title="{pct:.1f}%"></div></td></tr>')
        out.append("</table>")
    na = rep.get("not_applied") or []
    if na:
        counts = ", ".join(f"{v} {_esc(k)}" for k, v in rep["not_applied_counts"].items())
        out.append(f'<div class="sdtoolkit-warning">{len(na)} modules would not be applied: {counts}</div>')
        out.append('<table class="sdtoolkit-table sdtoolkit-lora-not-applied"><tr><th>Module</th><th>Reason</th>'
                   '<th>Detail</th></tr>')
        out += [f"<tr><td>{_esc(x['module'])}</td><td>{_esc(x['reason'])}</td><td>{_esc(x['detail'])}</td></tr>"
                for x in na]
        out.append("</table>")
    else:
        extra = "" if rep.get("model") else " (names and types; pick a checkpoint to check shapes too)"
        how = "baked (a control LoRA is not applied at generation)" if rep.get("control") else "applied"
        out.append(f'<div class="sdtoolkit-ok">Every module would be {how}{extra}.</div>')
    meta = rep.get("metadata") or {}
    if meta:
        out.append(f"<details><summary>Metadata ({len(meta)} keys)</summary>"
                   '<table class="sdtoolkit-table">')
        for k in sorted(meta):
            v = str(meta[k])
            out.append(f"<tr><th>{_esc(k)}</th><td>{_esc(v if len(v) < 300 else v[:297] + '...')}</td></tr>")
        out.append("</table></details>")
    out.append("</div>")
    return "".join(out)


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
        return inspect_html(report.to_dict()), report.to_dict()
    return f'<div class="sdtoolkit-ok">{text.replace(chr(10), "<br>")}</div>', report.to_dict()


def _updates(host: Host, kind: str, *current: Optional[str]) -> List[Any]:
    names = _names(host, kind)
    return [gr.update(choices=names, value=keep_value(names, c) if c else None) for c in current]


def build(host: Host) -> None:
    from ..jobs.faces import bind

    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="sdtoolkit_lora_refresh", elem_classes=["sdtoolkit-tool"])
    lo_names, ck = _names(host, "lora"), _names(host, "checkpoint")
    with gr.Tab("Inspect", elem_id="sdtoolkit_lora_inspect_tab"):
        with gr.Row():
            lora = gr.Dropdown(choices=lo_names, label="LoRA", elem_id="sdtoolkit_lora_inspect_file")
            in_model = gr.Dropdown(choices=ck, label="Check against checkpoint (optional)",
                                   elem_id="sdtoolkit_lora_inspect_model")
        btn = gr.Button("Inspect", elem_id="sdtoolkit_lora_inspect_btn")
        out = gr.HTML()
    with gr.Tab("Resize", elem_id="sdtoolkit_lora_resize_tab"):
        rs_lora = gr.Dropdown(choices=lo_names, label="LoRA", elem_id="sdtoolkit_lora_resize_file")
        with gr.Row():
            rs_rank = gr.Number(value=16, label="Rank (dynamic: the largest)", precision=0,
                                elem_id="sdtoolkit_lora_resize_rank")
            rs_method = gr.Dropdown(choices=["fixed", "sv_ratio", "sv_fro", "sv_cumulative"], value="fixed",
                                    label="Dynamic method", elem_id="sdtoolkit_lora_resize_method")
            rs_param = gr.Number(value=0.9, label="Dynamic parameter", elem_id="sdtoolkit_lora_resize_param")
            rs_dtype = gr.Dropdown(choices=["keep", "fp16", "bf16", "fp32"], value="keep", label="Dtype")
            rs_device = gr.Dropdown(choices=["cpu", "cuda"], value="cpu", label="Device")
        rs_out = gr.Textbox(label="Output file name", value="resized.safetensors", elem_id="sdtoolkit_lora_rs_out")
        rs_over = gr.Checkbox(label="Overwrite", value=False)
        rs_btn = gr.Button("Resize", variant="primary", elem_id="sdtoolkit_lora_resize_btn")
        rs_res = gr.HTML()
    with gr.Tab("Merge", elem_id="sdtoolkit_lora_merge_tab"):
        mg_loras = gr.Textbox(lines=3, label="LoRAs, one per line: NAME[:WEIGHT]", elem_id="sdtoolkit_lora_merge_list")
        with gr.Row():
            mg_rank = gr.Number(value=0, label="Rank (0 = exact: factors concatenated)", precision=0,
                                elem_id="sdtoolkit_lora_merge_rank")
            mg_model = gr.Dropdown(choices=ck, label="Checkpoint for LoHa/LoKr conv shapes (optional)",
                                   elem_id="sdtoolkit_lora_merge_model")
            mg_dtype = gr.Dropdown(choices=["keep", "fp16", "bf16", "fp32"], value="keep", label="Dtype")
            mg_device = gr.Dropdown(choices=["cpu", "cuda"], value="cpu", label="Device")
        mg_out = gr.Textbox(label="Output file name", value="merged.safetensors", elem_id="sdtoolkit_lora_mg_out")
        mg_over = gr.Checkbox(label="Overwrite", value=False)
        mg_btn = gr.Button("Merge", variant="primary", elem_id="sdtoolkit_lora_merge_btn")
        mg_res = gr.HTML()
    with gr.Tab("Extract", elem_id="sdtoolkit_lora_extract_tab"):
        tuned = gr.Dropdown(choices=ck, label="Tuned checkpoint", elem_id="sdtoolkit_lora_tuned")
        base = gr.Dropdown(choices=ck, label="Base checkpoint", elem_id="sdtoolkit_lora_base")
        with gr.Row():
            rank = gr.Number(value=32, label="Rank", precision=0)
            conv_rank = gr.Number(value=0, label="Conv rank (0 = attention only)", precision=0)
            clamp = gr.Number(value=1.0, label="Clamp quantile (1 = off, faithful)")
            device = gr.Dropdown(choices=["cpu", "cuda"], value="cpu", label="Device")
            dtype = gr.Dropdown(choices=["fp16", "bf16", "fp32"], value="fp16", label="Dtype",
                                elem_id="sdtoolkit_lora_ex_dtype")
        with gr.Row():
            rank_mode = gr.Dropdown(choices=["fixed", "energy"], value="fixed", label="Rank per layer",
                                    elem_id="sdtoolkit_lora_ex_rank_mode")
            energy = gr.Number(value=0.95, label="Energy kept (rank mode energy)")
            svd = gr.Dropdown(choices=["auto", "full", "randomized"], value="auto", label="SVD")
        output = gr.Textbox(label="Output file name", value="extracted.safetensors", elem_id="sdtoolkit_lora_ex_out")
        overwrite = gr.Checkbox(label="Overwrite", value=False)
        btn2 = gr.Button("Extract", variant="primary", elem_id="sdtoolkit_lora_extract_btn")
        res2 = gr.HTML()
    with gr.Tab("Bake", elem_id="sdtoolkit_lora_bake_tab"):
        ckpt = gr.Dropdown(choices=ck, label="Checkpoint", elem_id="sdtoolkit_lora_bake_ckpt")
        loras = gr.Textbox(lines=3, label="LoRAs, one per line: NAME[:MULT][:lbw=BLOCKS] (the Block weights tab "
                                          "writes such lines)", elem_id="sdtoolkit_lora_bake_list")
        output3 = gr.Textbox(label="Output file name", value="baked.safetensors", elem_id="sdtoolkit_lora_bake_out")
        overwrite3 = gr.Checkbox(label="Overwrite", value=False)
        btn3 = gr.Button("Bake", variant="primary", elem_id="sdtoolkit_lora_bake_btn")
        res3 = gr.HTML(elem_id="sdtoolkit_lora_bake_result")
    with gr.Tab("Block weights", elem_id="sdtoolkit_lora_lbw_tab"):
        lbw_editor.build(host, bake_list=loras)
    lora_convert_panel.build(host)

    lora_lists = [lora, rs_lora]
    ck_lists = [tuned, base, ckpt, in_model, mg_model]

    def do_refresh(*current):
        host.refresh("lora")
        host.refresh("checkpoint")
        n = len(lora_lists)
        return tuple(_updates(host, "lora", *current[:n]) + _updates(host, "checkpoint", *current[n:]))

    refresh.click(do_refresh, inputs=lora_lists + ck_lists, outputs=lora_lists + ck_lists)

    btn.click(lambda n, m: run_action(host, "inspect", {"lora": n or "", "model": m or None})[0],
              inputs=[lora, in_model], outputs=[out])

    def written_lora(status, rep, current):
        """A job that wrote a LoRA: its status, and the LoRA lists refreshed with the new file picked."""
        new = rep["name"] if rep else None
        return (status, *_updates(host, "lora", *[new or c for c in current]))

    rs_inputs, rs_values = bind({"lora": rs_lora, "rank": rs_rank, "dynamic_method": rs_method,
                                 "dynamic_param": rs_param, "dtype": rs_dtype, "device": rs_device,
                                 "output": rs_out, "overwrite": rs_over})

    def do_resize(progress=gr.Progress(), lo=None, *values):
        status, rep = run_action(host, "resize", rs_values(*values), progress)
        return written_lora(status, rep, [lo])

    writes(rs_btn.click(do_resize, inputs=[lora] + rs_inputs, outputs=[rs_res, lora]))

    mg_inputs, mg_values = bind({"loras": mg_loras, "rank": mg_rank, "model": mg_model, "dtype": mg_dtype,
                                 "device": mg_device, "output": mg_out, "overwrite": mg_over})

    def do_merge(progress=gr.Progress(), lo=None, *values):
        status, rep = run_action(host, "merge", mg_values(*values), progress)
        return written_lora(status, rep, [lo])

    writes(mg_btn.click(do_merge, inputs=[lora] + mg_inputs, outputs=[mg_res, lora]))

    ex_inputs, ex_values = bind({"tuned": tuned, "base": base, "rank": rank, "conv_rank": conv_rank,
                                 "clamp_quantile": clamp, "device": device, "dtype": dtype, "output": output,
                                 "overwrite": overwrite, "rank_mode": rank_mode, "energy": energy, "svd": svd})

    # gradio finds a gr.Progress default only among the positional parameters before ``*values``
    def do_extract(progress=gr.Progress(), lo=None, *values):
        status, rep = run_action(host, "extract", ex_values(*values), progress)
        return written_lora(status, rep, [lo])

    writes(btn2.click(do_extract, inputs=[lora] + ex_inputs, outputs=[res2, lora]))

    bk_inputs, bk_values = bind({"checkpoint": ckpt, "loras": loras, "output": output3, "overwrite": overwrite3})

    def do_bake(progress=gr.Progress(), t=None, b=None, *values):
        status, rep = run_action(host, "bake", bk_values(*values), progress)
        return (status, *_updates(host, "checkpoint", t, b, values[0]))

    writes(btn3.click(do_bake, inputs=[tuned, base] + bk_inputs, outputs=[res3, tuned, base, ckpt]))
