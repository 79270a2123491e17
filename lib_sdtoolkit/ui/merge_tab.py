"""Merge tab: pick checkpoints from the models folder, a method and ratios (or per-block ratios / a preset, shown
as a plot), run the streaming merge with progress, see the report. The merged file lands in the checkpoint folder
and the host's checkpoint list is refreshed.

Where the host holds a model (the WebUI), three more buttons: "Merge into loaded model (no file)", "Save current
merge" (writes that merge to the checkpoint folder) and "Restore loaded model" (reloads its checkpoint file). In
the standalone app they are hidden."""
from __future__ import annotations

import html
import logging
from typing import Any, Dict, List, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from ..merge import methods as merge_methods
from ..jobs.merge import MERGE_DTYPES
from .common import (error_html, gradio_progress, keep_value, register_picker, stop_button, supported_kwargs,
                     writes)

#: what the Merge tab says on Forge, where the three loaded-model buttons are not offered
FORGE_NO_LIVE_MERGE = ("**Merge into the loaded model** (and *Save current merge* / *Restore loaded model*) is not "
                       "available on Forge: Forge's patchers own the loaded model's weights. Merge to a file here, "
                       "then pick the new file in Forge's checkpoint list.")

log = logging.getLogger(__name__)

TITLE = "Merge"
ELEM_ID = "merge"
METHODS = list(merge_methods.names())  # the registry's methods, in declaration order
NONE = "None"
#: the Device dropdown's first entry: the host's device (--sdtoolkit-device in the WebUI)
DEFAULT_DEVICE = "default"


def checkpoint_choices(host: Host) -> List[str]:
    return [host.display_name(p, "checkpoint") for p in host.list_models("checkpoint")]


def vae_choices(host: Host) -> List[str]:
    return [NONE] + [host.display_name(p, "vae") for p in host.list_models("vae")]


def _family(host: Host, model: Optional[str]) -> str:
    """The block vocabulary's architecture of a checkpoint (SD1 / SD2 / SDXL / SDXL-refiner / Flux.1; header only),
    SD1 when unknown."""
    if not model:
        return "SD1"
    try:
        from ..arch import detect
        from ..arch.blocks import MBW, convention
        from ..files import read_infos

        arch = detect(read_infos(host.resolve(model, "checkpoint"))[1]).architecture
        convention(MBW, arch)
        return arch
    except Exception:
        return "SD1"


def block_names(family: str) -> List[str]:
    """The MBW block names of ``family``, BASE first (from :mod:`lib_sdtoolkit.arch.blocks`)."""
    from ..arch.blocks import MBW, block_names as names

    return names(family, MBW)


def fmt_ratio(v: float) -> str:
    """A ratio as the editor shows it: rounded to 3 decimals, no trailing zeros (0.199031876929 -> 0.199)."""
    s = f"{round(float(v), 3):.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def preset_text(preset: str, family: str) -> str:
    """The block box's text for a preset: BASE first, each value rounded to 3 decimals."""
    from ..merge.presets import get_preset

    base, vals = get_preset(preset, family)
    return ",".join(fmt_ratio(v) for v in [base] + list(vals))


def preset_texts(preset: str) -> List[str]:
    """The block box's text of ``preset`` for every architecture with merge blocks."""
    from ..arch.blocks import MBW, TABLES

    out = []
    for fam in TABLES[MBW]:
        try:
            out.append(preset_text(preset, fam))
        except SdToolkitError:
            continue
    return out


def cross_arch_note(preset: Optional[str], family: str) -> str:
    """What happens to an SD1 preset's 25 UNet values on ``family`` (said, never silent): blocks that SD1 has and
    ``family`` lacks are cut; blocks the other way round are stretched by ``from_sd1_unet``'s rule."""
    if not preset:
        return ""
    sd1 = block_names("SD1")[1:]
    target = block_names(family)[1:]
    if target == sd1:
        return ""
    cut = [b for b in sd1 if b not in target]
    new = [b for b in target if b not in sd1]
    parts = [f"The presets are SD1 lists of {len(sd1)} UNet values; {family} has {len(target)} UNet blocks."]
    if cut:
        from ..arch.blocks import describe

        parts.append(f"Cut: {describe(cut)} (no such blocks in {family}); each other block keeps the value of the "
                     f"SD1 block of the same name.")
    if new:
        parts.append(f"Stretched over {family}'s blocks ({len(new)} blocks without an SD1 name).")
    return " ".join(parts)


def block_table(host: Host, model_a: Optional[str], preset: Optional[str], blocks: Optional[str], alpha: float,
                base_alpha: Optional[str]) -> Tuple[Any, str]:
    """(DataFrame slot/block/ratio for the plot, message) for the ratios the merge would use."""
    import pandas as pd

    from ..merge.recipe import MergeRecipe

    fam = _family(host, model_a)
    try:
        r = MergeRecipe(model_a or "A", "B", preset=preset or None, blocks=blocks or None, alpha=float(alpha),
                        base_alpha=_float_or_none(base_alpha), allow_extrapolation=True)
        ratios, _ = r.block_ratios(fam)
        msg = f"{fam}: {len(ratios) - 1} UNet blocks + BASE"
    except SdToolkitError as exc:
        return pd.DataFrame({"slot": [], "block": [], "ratio": []}), str(exc)
    names = list(ratios)
    df = pd.DataFrame({"slot": list(range(len(names))), "block": names, "ratio": [ratios[n] for n in names]})
    return df, msg


def block_warnings(values: Dict[str, float], allow_extrapolation: bool = False) -> List[str]:
    """Values outside [0, 1], by block name."""
    out = [f"{b} = {fmt_ratio(v)}" for b, v in values.items() if not 0.0 <= v <= 1.0]
    if not out:
        return []
    what = "extrapolates (allowed)" if allow_extrapolation else "is outside [0, 1]: the merge refuses it unless " \
                                                                  "'Allow ratios outside [0, 1]' is ticked"
    return [f"{', '.join(out)} {what}."]


def chart_html(values: Dict[str, float], label: str = "share of B per block") -> str:
    """An SVG chart of the block ratios: the UNet blocks as a line with their names on the axis, BASE apart on the
    left as its own point (not joined to the UNet curve); values outside [0, 1] in red beyond the dashed range."""
    if not values:
        return ""
    names = list(values)
    base = values.get("BASE")
    unet = [(n, values[n]) for n in names if n != "BASE"]
    lo = min([0.0] + list(values.values()))
    hi = max([1.0] + list(values.values()))
    W, H, L, R, T, B = 720, 230, 44, 36, 12, 58
    gap = 46 if base is not None else 0
    step = (W - L - R - gap) / max(1, len(unet) - 1)

    def y(v: float) -> float:
        return T + (hi - v) / (hi - lo) * (H - T - B)

    parts = [f'<svg class="sdtoolkit-chart" viewBox="0 0 {W} {H}" width="100%" role="img" '
             f'aria-label="{html.escape(label)}">']
    for v in (0.0, 0.5, 1.0):
        dash = ' stroke-dasharray="4 3"' if v in (0.0, 1.0) else ""
        parts.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="sdtoolkit-chart-grid"'
                     f'{dash}/><text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="sdtoolkit-chart-tick">'
                     f'{v:g}</text>')
    if base is not None:
        bx = L + 14
        cls = "sdtoolkit-chart-bad" if not 0 <= base <= 1 else "sdtoolkit-chart-base"
        parts.append(f'<circle cx="{bx}" cy="{y(base):.1f}" r="4.5" class="{cls}"><title>BASE {fmt_ratio(base)}'
                     f'</title></circle><text x="{bx}" y="{H - B + 14}" text-anchor="middle" '
                     f'class="sdtoolkit-chart-label">BASE</text>')
        parts.append(f'<line x1="{L + gap - 12}" x2="{L + gap - 12}" y1="{T}" y2="{H - B}" '
                     f'class="sdtoolkit-chart-sep"/>')
    x0 = L + gap
    pts = " ".join(f"{x0 + i * step:.1f},{y(v):.1f}" for i, (_, v) in enumerate(unet))
    parts.append(f'<polyline points="{pts}" class="sdtoolkit-chart-line" fill="none"/>')
    for i, (n, v) in enumerate(unet):
        x = x0 + i * step
        cls = "sdtoolkit-chart-bad" if not 0 <= v <= 1 else "sdtoolkit-chart-dot"
        parts.append(f'<circle cx="{x:.1f}" cy="{y(v):.1f}" r="3.2" class="{cls}"><title>{html.escape(n)} '
                     f'{fmt_ratio(v)}</title></circle><text transform="translate({x + 3:.1f},{H - B + 8}) '
                     f'rotate(60)" class="sdtoolkit-chart-label">{html.escape(n)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def editor_state(host: Host, model_a: Optional[str], preset: Optional[str], blocks: Optional[str], alpha: float,
                 base_alpha: Optional[str], allow_extrapolation: bool = False) -> Tuple[List[List[Any]], str, str]:
    """(table rows [block, ratio], chart html, message html) of the block editor for the current values. Without a
    block list or preset every block takes M: no rows (the table stays empty, so it sends nothing)."""
    if not (blocks or "").strip() and not preset:
        return [], "", ('<div class="sdtoolkit-hint">No block list: every block takes M. Pick a preset or type a '
                        'list to edit per block.</div>')
    df, msg = block_table(host, model_a, None if blocks else preset, blocks, alpha, base_alpha)
    if not len(df):
        return [], "", f'<div class="sdtoolkit-error">{html.escape(msg)}</div>' if msg else ""
    values = {str(b): float(r) for b, r in zip(df["block"], df["ratio"])}
    fam = _family(host, model_a)
    notes = [msg]
    if preset and blocks == preset_text(preset, fam):
        notes.append(f"preset {preset}: its exact values are used; the output, report and metadata name it")
    warn = block_warnings(values, allow_extrapolation)
    cross = cross_arch_note(preset if blocks == (preset_text(preset, fam) if preset else None) else None, fam)
    out = f'<div class="sdtoolkit-hint">{html.escape("; ".join(notes))}</div>'
    for w in warn + ([cross] if cross else []):
        out += f'<div class="sdtoolkit-warn">{html.escape(w)}</div>'
    rows = [[b, fmt_ratio(v)] for b, v in values.items()]
    return rows, chart_html(values), out


def table_text(rows: Any) -> str:
    """The block box's text from the editor's table (BASE first, as shown)."""
    if rows is None:
        return ""
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    vals = []
    for row in rows:
        if len(row) < 2 or str(row[0]).strip() == "":
            continue
        v = row[1]
        try:
            vals.append(fmt_ratio(float(v)))
        except (TypeError, ValueError):
            vals.append(str(v).strip())
    return ",".join(vals)


def method_help(method: str) -> Tuple[bool, bool, Optional[Any], Any, str]:
    """(takes C, needs C, beta Ratio or None, alpha Ratio, one-line formula) of a registered method."""
    m = merge_methods.get(method)
    return m.takes_c, m.needs_c, m.beta, m.alpha, f"**{m.title}**: `{m.formula}` ({m.help})"


def _float_or_none(v: Any) -> Optional[float]:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"base alpha must be a number, got {v!r}") from None


def merge_request(values: Dict[str, Any], **fixed: Any):
    """The merge job's request from the tab's values (``{field: value}``: the same fields as the API body)."""
    from ..jobs.faces import ui_request
    from ..jobs.merge import MergeRequest

    vals = dict(values)
    if vals.get("bake_vae") == NONE:
        vals["bake_vae"] = None
    if vals.get("device") == DEFAULT_DEVICE:
        vals["device"] = None
    method = vals.get("method")
    if not _uses_beta(method):
        vals["beta"] = None
    if method in merge_methods.REGISTRY and not merge_methods.REGISTRY[method].takes_c:
        vals["model_c"] = None  # only what the method uses is sent
    preset, family = vals.pop("preset", None), vals.pop("family", None)
    if preset and family and (vals.get("blocks") or "").strip() == preset_text(preset, family):
        vals["preset"], vals["blocks"] = preset, None  # unedited: the preset itself (exact values, its name)
    return ui_request(MergeRequest, vals, **fixed)


def _uses_beta(method: Any) -> bool:
    """The method declares a second parameter (share of C, density, drop rate): the beta slider is sent."""
    return method in merge_methods.REGISTRY and merge_methods.REGISTRY[method].beta is not None


def _run(job: str, host: Host, request: Any, progress: Any) -> Any:
    from ..jobs import get

    return get(job).run(host, request, gradio_progress(progress, stop_key="merge"))


def run_merge(host: Host, values: Dict[str, Any], progress: Any = None) -> Tuple[str, str, Optional[dict]]:
    """Click handler: (status html, report text, report json)."""
    try:
        report = _run("merge", host, merge_request(values), progress).to_dict()
        lines = _report_lines(report) + [f"Output: {report['output']}"]
        ok = (f'<div class="sdtoolkit-ok">Saved <b>{html.escape(report["name"])}</b>; it is in the checkpoint '
              f'list now.</div>')
        return ok, "\n".join(lines), report
    except SdToolkitError as exc:
        return error_html(exc), str(exc), None
    except Exception as exc:
        log.exception("sdtoolkit: merge failed")
        return error_html(exc), f"{type(exc).__name__}: {exc}", None


def _report_lines(report: Dict[str, Any]) -> List[str]:
    lines = [f"Merged {report['architecture']} with {report['method']}: {report['keys_total']} keys "
             f"({report['merged']} merged, {report['copied_from_a']} from A) in {report['seconds']:.1f} s"]
    for what in ("missing_from_b", "missing_from_c"):
        if report.get(what):
            lines.append(f"{len(report[what])} keys {what.replace('_', ' ')} taken from A")
    lines.append(f"EMA keys dropped: {report['ema_dropped']}; discarded: {report['discarded']}; "
                 f"VAE keys baked: {report['vae_baked']}; position_ids: {report['position_ids']}")
    return lines


def run_in_memory(host: Host, values: Dict[str, Any], progress: Any = None) -> Tuple[str, str, Optional[dict]]:
    """"Merge into loaded model (no file)": the same values as :func:`run_merge`; nothing is written."""
    try:
        report = _run("merge-in-memory", host, merge_request(values), progress).to_dict()
        lines = _report_lines(report) + [f"Loaded model is now {report['title']} (no file written; the loaded "
                                         f"model's own file is {report['original_file']})"]
        ok = (f'<div class="sdtoolkit-ok">Merged into the loaded model as <b>{html.escape(report["name"])}</b>. '
              f'"Save current merge" writes it to a file; "Restore loaded model" reloads the original.</div>')
        return ok, "\n".join(lines), report
    except SdToolkitError as exc:
        return error_html(exc), str(exc), None
    except Exception as exc:
        log.exception("sdtoolkit: merge into the loaded model failed")
        return (error_html(exc), f"{type(exc).__name__}: {exc} (the loaded model may be partly merged: restore it "
                f"or load the checkpoint again)", None)


def save_current(host: Host, output: str, overwrite: bool, progress: Any = None) -> Tuple[str, str, Optional[dict]]:
    """"Save current merge": writes the loaded model's in-memory merge (its recipe, from the same files)."""
    from ..jobs.faces import ui_request
    from ..jobs.merge import SaveCurrentRequest

    try:
        req = ui_request(SaveCurrentRequest, {"output": output, "overwrite": bool(overwrite)})
        report = _run("merge-save-current", host, req, progress).to_dict()
        ok = (f'<div class="sdtoolkit-ok">Saved <b>{html.escape(report["name"])}</b>; it is in the checkpoint '
              f'list now.</div>')
        return ok, "\n".join(_report_lines(report) + [f"Output: {report['output']}"]), report
    except SdToolkitError as exc:
        return error_html(exc), str(exc), None
    except Exception as exc:
        log.exception("sdtoolkit: saving the current merge failed")
        return error_html(exc), f"{type(exc).__name__}: {exc}", None


def restore_loaded(host: Host) -> Tuple[str, str, Optional[dict]]:
    from ..jobs.merge import RestoreRequest

    try:
        res = _run("merge-restore", host, RestoreRequest(), None).to_dict()
        return (f'<div class="sdtoolkit-ok">Reloaded <b>{html.escape(res["restored"])}</b>.</div>',
                f"Reloaded {res['path']}", res)
    except SdToolkitError as exc:
        return error_html(exc), str(exc), None
    except Exception as exc:
        log.exception("sdtoolkit: restoring the loaded model failed")
        return error_html(exc), f"{type(exc).__name__}: {exc}", None


def build(host: Host) -> None:
    from ..merge.presets import preset_names

    ckpts = checkpoint_choices(host)
    first = merge_methods.get("weighted_sum")
    with gr.Row():
        model_a = register_picker(gr.Dropdown(label="Model A (primary)", choices=ckpts,
                                              value=ckpts[0] if ckpts else None, elem_id="sdtoolkit_merge_a"),
                                  ("checkpoint",))
        model_b = register_picker(gr.Dropdown(label="Model B", choices=ckpts,
                                              value=ckpts[1] if len(ckpts) > 1 else None,
                                              elem_id="sdtoolkit_merge_b"), ("checkpoint",), default_index=1)
        model_c = register_picker(gr.Dropdown(label="Model C", choices=[""] + ckpts, value="",
                                              visible=first.takes_c, elem_id="sdtoolkit_merge_c"),
                                  ("checkpoint",), extra=("",), keep_empty=True)
        refresh_btn = gr.Button("Refresh", elem_id="sdtoolkit_merge_refresh", elem_classes=["sdtoolkit-tool"])
    with gr.Row():
        method = gr.Dropdown(label="Method", choices=list(merge_methods.names()), value="weighted_sum",
                             elem_id="sdtoolkit_merge_method")
        alpha = gr.Slider(label=f"M ({first.alpha.meaning})", minimum=0.0, maximum=1.0, step=0.01, value=0.5,
                          elem_id="sdtoolkit_merge_alpha")
        beta = gr.Slider(label=f"beta ({merge_methods.beta_label()})", minimum=0.0, maximum=1.0,
                         step=0.01, value=0.2, visible=first.beta is not None, elem_id="sdtoolkit_merge_beta")
    formula = gr.Markdown(method_help("weighted_sum")[4], elem_id="sdtoolkit_merge_formula")
    with gr.Accordion("Merge block weighted", open=False):
        with gr.Row():
            preset = gr.Dropdown(label="Preset", choices=[""] + preset_names(), value="",
                                 elem_id="sdtoolkit_merge_preset",
                                 **supported_kwargs(gr.Dropdown, info="SD presets name 25 blocks; on Flux.1 they "
                                                    "are stretched over D00..S37 (D00 = IN00, S09 = M00, S37 = OUT11, "
                                                    "linear in between)"))
            base_alpha = gr.Textbox(label="Base alpha (text encoder, VAE; blank: from the list / preset / M)",
                                    value="", elem_id="sdtoolkit_merge_base_alpha")
        blocks = gr.Textbox(label="Block ratios: 25 (SD1/SD2/SDXL refiner: IN00..IN11, M00, OUT00..OUT11), 19 "
                                  "(SDXL) or 57 (Flux.1: D00..D18, S00..S37) values, optionally BASE first; or edit "
                                  "the table", value="",
                            elem_id="sdtoolkit_merge_blocks")
        with gr.Row():
            table = gr.Dataframe(headers=["block", "ratio"], datatype=["str", "str"], interactive=True,
                                 value=[["BASE", ""]], row_count=(1, "dynamic"), col_count=(2, "fixed"),
                                 label="Ratio per block (share of B), 3 decimals", elem_id="sdtoolkit_merge_table",
                                 scale=1)
            with gr.Column(scale=3):
                chart = gr.HTML(elem_id="sdtoolkit_merge_chart")
                plot_msg = gr.HTML(elem_id="sdtoolkit_merge_plot_msg")
    with gr.Row():
        dtype = gr.Radio(label="Output dtype", choices=list(MERGE_DTYPES), value="fp16",
                         elem_id="sdtoolkit_merge_dtype")
        device = gr.Dropdown(label=f"Device (default: {getattr(host, 'device', 'cpu')})",
                             choices=[DEFAULT_DEVICE, "cpu", "cuda"], value=DEFAULT_DEVICE,
                             elem_id="sdtoolkit_merge_device")
        seed = gr.Number(label="Seed (DARE)", value=0, precision=0, visible=first.seeded,
                         elem_id="sdtoolkit_merge_seed")
    with gr.Row():
        keep_ema = gr.Checkbox(label="Keep EMA", value=False, elem_id="sdtoolkit_merge_keep_ema")
        fix_pos = gr.Checkbox(label="Reset CLIP position_ids (arange 77)", value=False,
                              elem_id="sdtoolkit_merge_fix_pos")
        allow_ex = gr.Checkbox(label="Allow ratios outside [0, 1]", value=False, elem_id="sdtoolkit_merge_extrap")
        overwrite = gr.Checkbox(label="Overwrite an existing output", value=False,
                                elem_id="sdtoolkit_merge_overwrite")
    with gr.Row():
        bake_vae = register_picker(gr.Dropdown(label="Bake in VAE", choices=vae_choices(host), value=NONE,
                                               elem_id="sdtoolkit_merge_vae"), ("vae",), extra=(NONE,))
        discard = gr.Textbox(label="Discard weights (regex)", value="", elem_id="sdtoolkit_merge_discard")
        output = gr.Textbox(label="Output file name (blank: A_B_method_ and the preset, the block list's digest or "
                                  "M)", value="", elem_id="sdtoolkit_merge_output")
    live = host.has_loaded_model_support  # the WebUI: merge into / save / restore the loaded model
    with gr.Row():
        run_btn = gr.Button("Merge", variant="primary", elem_id="sdtoolkit_merge_run")
        mem_btn = gr.Button("Merge into loaded model (no file)", visible=live, elem_id="sdtoolkit_merge_in_memory")
        save_cur_btn = gr.Button("Save current merge", visible=live, elem_id="sdtoolkit_merge_save_current")
        restore_btn = gr.Button("Restore loaded model", visible=live, elem_id="sdtoolkit_merge_restore")
    if not live and getattr(host, "name", "") == "forge":
        gr.Markdown(FORGE_NO_LIVE_MERGE, elem_id="sdtoolkit_merge_forge_note")
    status = gr.HTML(elem_id="sdtoolkit_merge_status")
    stop_button("merge", status)
    report_text = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="sdtoolkit_merge_report")
    with gr.Accordion("JSON", open=False):
        report_json = gr.JSON(elem_id="sdtoolkit_merge_json")

    def on_method(m):
        takes_c, needs_c, b, a, line = method_help(m)
        c_label = "Model C (required)" if needs_c else "Model C (optional)"
        beta_up = (gr.update(visible=True, label=f"beta ({b.meaning})", value=b.default)
                   if b is not None and b.default is not None else gr.update(visible=b is not None,
                                                                            label=f"beta ({b.meaning})" if b else
                                                                            "beta"))
        return (gr.update(visible=takes_c, label=c_label), gr.update(label=f"M ({a.meaning})"), beta_up,
                gr.update(visible=merge_methods.get(m).seeded), line)

    method.change(on_method, inputs=[method], outputs=[model_c, alpha, beta, seed, formula])

    def update_editor(a, p, bl, al, ba, ex):
        rows, svg, msg = editor_state(host, a, p, bl, al, ba, ex)
        return gr.update(value=rows or [["BASE", ""]]), svg, msg

    def pick_preset(a, p, bl, al, ba, ex):
        if p:
            bl = preset_text(p, _family(host, a))
        return (bl,) + update_editor(a, p, bl, al, ba, ex)

    def on_model_a(a, p, bl, al, ba, ex):
        """An unedited preset follows model A's architecture (its block count); an edited list stays as typed."""
        if p and (bl or "").strip() in preset_texts(p):
            return pick_preset(a, p, bl, al, ba, ex)
        return (gr.update(),) + update_editor(a, p, bl, al, ba, ex)

    def from_table(rows, bl):
        text = table_text(rows)
        return gr.update() if text == (bl or "").strip() else text

    def do_refresh(a, b, c, v):
        host.refresh("checkpoint")
        new = checkpoint_choices(host)
        vaes = vae_choices(host)
        return (gr.update(choices=new, value=keep_value(new, a)), gr.update(choices=new, value=keep_value(new, b)),
                gr.update(choices=[""] + new, value=keep_value([""] + new, c)),
                gr.update(choices=vaes, value=keep_value(vaes, v)))

    editor_inputs = [model_a, preset, blocks, alpha, base_alpha, allow_ex]
    preset.change(pick_preset, inputs=editor_inputs, outputs=[blocks, table, chart, plot_msg])
    model_a.change(on_model_a, inputs=editor_inputs, outputs=[blocks, table, chart, plot_msg])
    for comp in (blocks, base_alpha, allow_ex):
        comp.change(update_editor, inputs=editor_inputs, outputs=[table, chart, plot_msg])
    table.change(from_table, inputs=[table, blocks], outputs=[blocks])
    refresh_btn.click(do_refresh, inputs=[model_a, model_b, model_c, bake_vae],
                      outputs=[model_a, model_b, model_c, bake_vae])

    from ..jobs.faces import bind

    merge_inputs, unpack = bind({
        "model_a": model_a, "model_b": model_b, "model_c": model_c, "method": method, "alpha": alpha, "beta": beta,
        "blocks": blocks, "base_alpha": base_alpha, "dtype": dtype, "keep_ema": keep_ema,
        "fix_position_ids": fix_pos, "bake_vae": bake_vae, "discard": discard, "seed": seed, "device": device,
        "allow_extrapolation": allow_ex, "output": output, "overwrite": overwrite})
    n_bound = len(merge_inputs)

    def values_of(values: Tuple[Any, ...]) -> Dict[str, Any]:
        """The bound values, and the preset picker after them (an unedited preset is sent by name)."""
        vals = unpack(*values[:n_bound])
        if len(values) > n_bound and values[n_bound]:
            vals.update(preset=values[n_bound], family=_family(host, vals.get("model_a")))
        return vals

    # gradio finds a gr.Progress default only among the parameters before *values
    def do_merge(progress=gr.Progress(), *values):
        return run_merge(host, values_of(values), progress=progress)

    writes(run_btn.click(do_merge, inputs=merge_inputs + [preset], outputs=[status, report_text, report_json]))

    if live:
        def do_in_memory(progress=gr.Progress(), *values):
            return run_in_memory(host, values_of(values), progress=progress)

        def do_save_current(out, ow, a, b, c, v, progress=gr.Progress()):
            res = save_current(host, out, ow, progress=progress)
            return res + do_refresh(a, b, c, v)

        mem_btn.click(do_in_memory, inputs=merge_inputs + [preset], outputs=[status, report_text, report_json])
        writes(save_cur_btn.click(do_save_current, inputs=[output, overwrite, model_a, model_b, model_c, bake_vae],
                                  outputs=[status, report_text, report_json, model_a, model_b, model_c, bake_vae]))
        restore_btn.click(lambda: restore_loaded(host), inputs=[], outputs=[status, report_text, report_json])
