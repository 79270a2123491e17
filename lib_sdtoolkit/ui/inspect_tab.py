"""Inspect tab: pick a model, see its architecture, components and the full report."""
from __future__ import annotations

import html
import logging
from typing import Any, List, Optional, Tuple

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import MODEL_KINDS, Host
from .common import (empty_table, error_html, gradio_progress, human_bytes, keep_value, model_choices, model_picker,
                     parse_choice, writes)

log = logging.getLogger(__name__)

TITLE = "Inspect"
ELEM_ID = "inspect"
TABLE_HEADERS = ["component", "keys", "size"]


def architecture_html(report: dict, name: str) -> str:
    arch = html.escape(str(report.get("architecture", "unknown")))
    variant = report.get("variant")
    extra = f' <span class="sdtoolkit-arch-variant">{html.escape(str(variant))}</span>' if variant else ""
    fmt = html.escape(str(report.get("format", "")))
    total = human_bytes(report.get("total_bytes"))
    return (f'<div class="sdtoolkit-arch"><span class="sdtoolkit-arch-name" id="sdtoolkit_arch_name">{arch}</span>'
            f'{extra}<div class="sdtoolkit-arch-file">{html.escape(name)} · {fmt} · {total}</div></div>')


def components_rows(report: dict) -> List[List[Any]]:
    rows: List[List[Any]] = []
    for comp, info in (report.get("components") or {}).items():
        rows.append([comp, int(info.get("keys", 0)), human_bytes(info.get("bytes"))])
    ema = report.get("ema") or {}
    if ema.get("keys"):
        rows.append(["ema", int(ema["keys"]), human_bytes(ema.get("bytes"))])
    junk = report.get("junk") or []
    if junk:
        rows.append(["junk", len(junk), ""])
    return rows or [["(none)", 0, ""]]


def picked(choice: Optional[str], path: Optional[str]) -> Tuple[str, Optional[str], str]:
    """``(name, kind, note)`` of the model a picker names: the path box when it holds text, else the dropdown.
    ``note`` says which one was used when both hold something (nothing silently wins)."""
    typed = (path or "").strip()
    if typed:
        kind, shown = None, typed
        note = (f"Used the name typed in the path box ({typed}), not the dropdown's {choice}; clear the box to "
                f"use the dropdown." if choice else "")
        return shown, kind, note
    if choice:
        kind, name = parse_choice(choice)
        return name, kind, ""
    raise InvalidInputError("pick a model or type its path first")


def note_html(note: str) -> str:
    return f'<div class="sdtoolkit-warn sdtoolkit-source-note">{html.escape(note)}</div>' if note else ""


def run_inspect(host: Host, choice: str, path: str, progress: Any = None) -> Tuple[str, Any, str, Any]:
    """Click handler: (architecture html, components rows, report text, report json)."""
    from ..jobs import get
    from ..jobs.faces import ui_request
    from ..jobs.inspect import InspectRequest

    try:
        name, kind, note = picked(choice, path)
        req = ui_request(InspectRequest, {"path": [name], "kind": kind})
        rep = get("inspect").run(host, req, gradio_progress(progress))
        report = rep.to_dict()
        return (architecture_html(report, report["name"]) + note_html(note), components_rows(report),
                rep.summary(), report)
    except SdToolkitError as exc:
        return error_html(exc), empty_table(TABLE_HEADERS), str(exc), None
    except Exception as exc:  # a bug, not bad input: still show it instead of a silent spinner
        log.exception("sdtoolkit: inspect failed")
        return error_html(exc), empty_table(TABLE_HEADERS), f"{type(exc).__name__}: {exc}", None


def build(host: Host) -> None:
    choices = model_choices(host)
    can_sample = host.models_root is not None
    with gr.Group(visible=not choices and can_sample, elem_id="sdtoolkit_inspect_empty") as empty_box:
        gr.Markdown(
            "No models found in "
            + ", ".join(f"`{d}`" for d in host.all_model_dirs())
            + ". Create a small generated sample library to try every tab at once: two tiny SD1.5 checkpoints of "
              "one family and an SDXL one, a VAE built so that its decode is the encoded image (and a byte copy of "
              "it), a LoRA, a ControlNet model, a sample image and its latent, all with the real key layouts.",
            elem_classes=["sdtoolkit-hint"])
        sample_btn = gr.Button("Create sample library", elem_id="sdtoolkit_inspect_sample")
    model, refresh_btn, path = model_picker(host, MODEL_KINDS, "inspect")
    run_btn = gr.Button("Inspect", variant="primary", elem_id="sdtoolkit_inspect_run")
    status = gr.HTML(elem_id="sdtoolkit_inspect_status")
    arch = gr.HTML(elem_id="sdtoolkit_inspect_arch")
    table = gr.Dataframe(value=empty_table(TABLE_HEADERS), headers=TABLE_HEADERS, datatype=["str", "number", "str"], interactive=False,
                         elem_id="sdtoolkit_inspect_components", label="Components")
    with gr.Accordion("Full report", open=True):
        report_text = gr.Textbox(lines=18, max_lines=60, show_label=False, interactive=False,
                                 elem_id="sdtoolkit_inspect_report", elem_classes=["sdtoolkit-mono"])
    with gr.Accordion("JSON", open=False):
        report_json = gr.JSON(elem_id="sdtoolkit_inspect_json")

    def do_refresh(current: str):
        host.refresh(None)
        new = model_choices(host)
        return (gr.update(choices=new, value=keep_value(new, current)),
                gr.update(visible=not new and can_sample))

    def do_sample(current: str, progress=gr.Progress()):
        try:
            from ..samples import library  # heavy (torch, ldm); only when asked

            p = gradio_progress(progress)
            written = library.write_sample_library(host.models_root, lambda n, d, t: p("writing " + n, d, t))
            host.refresh(None)
            msg = f'<div class="sdtoolkit-ok">Sample library written to {html.escape(str(host.models_root))}'
            if written:
                msg += f" ({len(list(written))} files)"
            msg += "</div>"
        except SdToolkitError as exc:
            msg = error_html(exc)
        except Exception as exc:
            log.exception("sdtoolkit: writing the sample library failed")
            msg = error_html(exc)
        new = model_choices(host)
        return (gr.update(choices=new, value=keep_value(new, current)),
                gr.update(visible=not new and can_sample), msg)

    refresh_btn.click(do_refresh, inputs=[model], outputs=[model, empty_box])
    writes(sample_btn.click(do_sample, inputs=[model], outputs=[model, empty_box, status]))
    def do_inspect(c, p, progress=gr.Progress()):
        return run_inspect(host, c, p, progress)

    run_btn.click(do_inspect, inputs=[model, path],
                  outputs=[arch, table, report_text, report_json])
