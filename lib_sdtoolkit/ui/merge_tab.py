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
from .common import error_html, gradio_progress, keep_value, supported_kwargs

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
        from ..files import read_infos

        from ..arch.blocks import vocabulary

        arch = detect(read_infos(host.resolve(model, "checkpoint"))[1]).architecture
        return arch if arch in vocabulary() else "SD1"
    except Exception:
        return "SD1"


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
    if not _uses_beta(vals.get("method")):
        vals["beta"] = None
    return ui_request(MergeRequest, vals, **fixed)


def _uses_beta(method: Any) -> bool:
    """The method declares a second parameter (share of C, density, drop rate): the beta slider is sent."""
    return method in merge_methods.REGISTRY and merge_methods.REGISTRY[method].beta is not None


def _run(job: str, host: Host, request: Any, progress: Any) -> Any:
    from ..jobs import get

    return get(job).run(host, request, gradio_progress(progress))


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
    with gr.Row():
        model_a = gr.Dropdown(label="Model A (primary)", choices=ckpts, value=ckpts[0] if ckpts else None,
                              elem_id="sdtoolkit_merge_a")
        model_b = gr.Dropdown(label="Model B (share M)", choices=ckpts, value=ckpts[1] if len(ckpts) > 1 else None,
                              elem_id="sdtoolkit_merge_b")
        model_c = gr.Dropdown(label=f"Model C ({merge_methods.model_c_label()})",
                              choices=[""] + ckpts, value="", elem_id="sdtoolkit_merge_c")
        refresh_btn = gr.Button("Refresh", elem_id="sdtoolkit_merge_refresh", elem_classes=["sdtoolkit-tool"])
    with gr.Row():
        method = gr.Dropdown(label="Method", choices=list(merge_methods.names()), value="weighted_sum",
                             elem_id="sdtoolkit_merge_method")
        alpha = gr.Slider(label="M (alpha, share of B)", minimum=0.0, maximum=1.0, step=0.01, value=0.5,
                          elem_id="sdtoolkit_merge_alpha")
        beta = gr.Slider(label=f"beta ({merge_methods.beta_label()})", minimum=0.0, maximum=1.0,
                         step=0.01, value=0.2, elem_id="sdtoolkit_merge_beta")
    with gr.Accordion("Merge block weighted", open=False):
        with gr.Row():
            preset = gr.Dropdown(label="Preset", choices=[""] + preset_names(), value="",
                                 elem_id="sdtoolkit_merge_preset",
                                 **supported_kwargs(gr.Dropdown, info="SD presets name 25 blocks; on Flux.1 they "
                                                    "are stretched over D00..S37 (D00 = IN00, S09 = M00, S37 = OUT11, "
                                                    "linear in between)"))
            base_alpha = gr.Textbox(label="Base alpha (text encoder, VAE; blank: from the list / preset / M)",
                                    value="", elem_id="sdtoolkit_merge_base_alpha")
        blocks = gr.Textbox(label="Block ratios: 25 (SD1/SD2/SDXL refiner: IN00..IN11, M00, OUT00..OUT11), 19 (SDXL) or 57 "
                                  "(Flux.1: D00..D18, S00..S37) values, optionally BASE first", value="",
                            elem_id="sdtoolkit_merge_blocks")
        plot = gr.LinePlot(x="slot", y="ratio", title="Share of B per block", elem_id="sdtoolkit_merge_plot",
                           height=220, **supported_kwargs(gr.LinePlot, tooltip=["block", "ratio"], width=600))
        plot_msg = gr.Markdown(elem_id="sdtoolkit_merge_plot_msg")
    with gr.Row():
        dtype = gr.Radio(label="Output dtype", choices=list(MERGE_DTYPES), value="fp16",
                         elem_id="sdtoolkit_merge_dtype")
        device = gr.Dropdown(label=f"Device (default: {getattr(host, 'device', 'cpu')})",
                             choices=[DEFAULT_DEVICE, "cpu", "cuda"], value=DEFAULT_DEVICE,
                             elem_id="sdtoolkit_merge_device")
        seed = gr.Number(label="Seed (DARE)", value=0, precision=0, elem_id="sdtoolkit_merge_seed")
    with gr.Row():
        keep_ema = gr.Checkbox(label="Keep EMA", value=False, elem_id="sdtoolkit_merge_keep_ema")
        fix_pos = gr.Checkbox(label="Reset CLIP position_ids (arange 77)", value=False,
                              elem_id="sdtoolkit_merge_fix_pos")
        allow_ex = gr.Checkbox(label="Allow ratios outside [0, 1]", value=False, elem_id="sdtoolkit_merge_extrap")
        overwrite = gr.Checkbox(label="Overwrite an existing output", value=False,
                                elem_id="sdtoolkit_merge_overwrite")
    with gr.Row():
        bake_vae = gr.Dropdown(label="Bake in VAE", choices=vae_choices(host), value=NONE,
                               elem_id="sdtoolkit_merge_vae")
        discard = gr.Textbox(label="Discard weights (regex)", value="", elem_id="sdtoolkit_merge_discard")
        output = gr.Textbox(label="Output file name (blank: A_B_method_M.safetensors)", value="",
                            elem_id="sdtoolkit_merge_output")
    live = host.has_loaded_model_support  # the WebUI: merge into / save / restore the loaded model
    with gr.Row():
        run_btn = gr.Button("Merge", variant="primary", elem_id="sdtoolkit_merge_run")
        mem_btn = gr.Button("Merge into loaded model (no file)", visible=live, elem_id="sdtoolkit_merge_in_memory")
        save_cur_btn = gr.Button("Save current merge", visible=live, elem_id="sdtoolkit_merge_save_current")
        restore_btn = gr.Button("Restore loaded model", visible=live, elem_id="sdtoolkit_merge_restore")
    if not live and getattr(host, "name", "") == "forge":
        gr.Markdown(FORGE_NO_LIVE_MERGE, elem_id="sdtoolkit_merge_forge_note")
    status = gr.HTML(elem_id="sdtoolkit_merge_status")
    report_text = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="sdtoolkit_merge_report")
    with gr.Accordion("JSON", open=False):
        report_json = gr.JSON(elem_id="sdtoolkit_merge_json")

    def update_plot(a, p, bl, al, ba):
        df, msg = block_table(host, a, p, bl, al, ba)
        return gr.update(value=df), msg

    def pick_preset(a, p, bl, al, ba):
        if p:
            from ..merge.presets import get_preset

            base, vals = get_preset(p, _family(host, a))
            bl = ",".join(repr(float(v)) for v in [base] + vals)  # exact round trip
        df, msg = block_table(host, a, None, bl, al, ba)
        return bl, gr.update(value=df), msg

    def do_refresh(a, b, c, v):
        host.refresh("checkpoint")
        new = checkpoint_choices(host)
        vaes = vae_choices(host)
        return (gr.update(choices=new, value=keep_value(new, a)), gr.update(choices=new, value=keep_value(new, b)),
                gr.update(choices=[""] + new, value=keep_value([""] + new, c)),
                gr.update(choices=vaes, value=keep_value(vaes, v)))

    plot_inputs = [model_a, preset, blocks, alpha, base_alpha]
    preset.change(pick_preset, inputs=plot_inputs, outputs=[blocks, plot, plot_msg])
    for comp in (blocks, base_alpha, model_a):
        comp.change(update_plot, inputs=plot_inputs, outputs=[plot, plot_msg])
    refresh_btn.click(do_refresh, inputs=[model_a, model_b, model_c, bake_vae],
                      outputs=[model_a, model_b, model_c, bake_vae])

    from ..jobs.faces import bind

    merge_inputs, unpack = bind({
        "model_a": model_a, "model_b": model_b, "model_c": model_c, "method": method, "alpha": alpha, "beta": beta,
        "blocks": blocks, "base_alpha": base_alpha, "dtype": dtype, "keep_ema": keep_ema,
        "fix_position_ids": fix_pos, "bake_vae": bake_vae, "discard": discard, "seed": seed, "device": device,
        "allow_extrapolation": allow_ex, "output": output, "overwrite": overwrite})

    # the preset was copied into the block box when picked; the box is what the merge uses
    # gradio finds a gr.Progress default only among the parameters before *values
    def do_merge(progress=gr.Progress(), *values):
        return run_merge(host, unpack(*values), progress=progress)

    run_btn.click(do_merge, inputs=merge_inputs, outputs=[status, report_text, report_json])

    if live:
        def do_in_memory(progress=gr.Progress(), *values):
            return run_in_memory(host, unpack(*values), progress=progress)

        def do_save_current(out, ow, a, b, c, v, progress=gr.Progress()):
            res = save_current(host, out, ow, progress=progress)
            return res + do_refresh(a, b, c, v)

        mem_btn.click(do_in_memory, inputs=merge_inputs, outputs=[status, report_text, report_json])
        save_cur_btn.click(do_save_current, inputs=[output, overwrite, model_a, model_b, model_c, bake_vae],
                           outputs=[status, report_text, report_json, model_a, model_b, model_c, bake_vae])
        restore_btn.click(lambda: restore_loaded(host), inputs=[], outputs=[status, report_text, report_json])
