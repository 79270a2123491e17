"""History tab: the recorded merges, prunes and LoRA tool runs (``history``), re-running one (``history-rerun``),
and the recipes a model carries in its metadata (``recipe``)."""
from __future__ import annotations

import html
import json
import logging
from typing import Any, List, Optional, Tuple

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import MODEL_KINDS, Host
from .common import (empty_table, error_html, gradio_progress, keep_value, model_choices, parse_choice,
                     register_picker, register_view, writes)

log = logging.getLogger(__name__)

TITLE = "History"
ELEM_ID = "history"
TABLE_HEADERS = ["id", "time", "job", "output", "sha256", "request"]


def history_rows(entries: List[dict]) -> List[List[Any]]:
    return [[e["id"], e.get("time", ""), e["job"], e.get("output", ""), (e.get("sha256") or "")[:12],
             json.dumps({k: v for k, v in e["request"].items() if v not in (None, False, "", [])}, default=str)]
            for e in entries]


def run_list(host: Host, job: Optional[str]) -> Tuple[Any, str, List[str]]:
    from ..jobs import get
    from ..jobs.faces import ui_request
    from ..jobs.history import HistoryRequest

    try:
        rep = get("history").run(host, ui_request(HistoryRequest, {"job_name": job or None}), None)
        rows = history_rows(rep.entries)
        note = "" if rows else '<div class="sdtoolkit-hint">No history yet: merges, prunes and LoRA tool runs ' \
                               'are recorded in their output folder.</div>'
        return (rows or empty_table(TABLE_HEADERS)), note, [r[0] for r in rows]
    except SdToolkitError as exc:
        return empty_table(TABLE_HEADERS), error_html(exc), []


def run_rerun(host: Host, entry: Optional[str], progress: Any = None) -> str:
    from ..jobs import get
    from ..jobs.faces import ui_request
    from ..jobs.history import RerunRequest

    try:
        if not entry:
            raise InvalidInputError("pick a history entry to re-run")
        rep = get("history-rerun").run(host, ui_request(RerunRequest, {"entry": entry}), gradio_progress(progress))
        cls = "sdtoolkit-ok" if rep.identical else "sdtoolkit-warn"
        return f'<div class="{cls}">{html.escape(rep.summary()).replace(chr(10), "<br>")}</div>'
    except SdToolkitError as exc:
        return error_html(exc)
    except Exception as exc:
        log.exception("sdtoolkit: history re-run failed")
        return error_html(exc)


def run_recipe(host: Host, choice: Optional[str]) -> Tuple[str, Any]:
    from ..jobs import get
    from ..jobs.faces import ui_request
    from ..jobs.history import RecipeRequest

    try:
        if not choice:
            raise InvalidInputError("pick a model")
        kind, name = parse_choice(choice)
        rep = get("recipe").run(host, ui_request(RecipeRequest, {"model": name, "kind": kind}), None)
        text = "" if rep.recipes else f'<div class="sdtoolkit-hint">{html.escape(rep.name)} carries no recipe.</div>'
        return text, rep.recipes
    except SdToolkitError as exc:
        return error_html(exc), None


def build(host: Host) -> None:
    gr.Markdown("Every merge, prune, bake and LoRA tool run is recorded in its output folder "
                "(`sdtoolkit-history.jsonl`). Re-running an entry writes the file again "
                "beside the original (`NAME.rerun-ID`) and says whether it is byte-identical.",
                elem_classes=["sdtoolkit-hint"])
    with gr.Row():
        job = gr.Dropdown(label="Job", choices=["", "merge", "merge-save-current", "prune", "lora-bake",
                                                 "lora-extract"], value="", elem_id="sdtoolkit_history_job",
                          scale=2)
        refresh = gr.Button("Refresh", elem_id="sdtoolkit_history_refresh", elem_classes=["sdtoolkit-tool"],
                            scale=1, min_width=90)
    rows, note, ids = run_list(host, None)
    status = gr.HTML(note, elem_id="sdtoolkit_history_status")
    table = gr.Dataframe(value=rows, headers=TABLE_HEADERS, interactive=False, elem_id="sdtoolkit_history_table",
                         label="History (newest first)")
    with gr.Row():
        entry = gr.Dropdown(label="Entry", choices=ids, value=ids[0] if ids else None,
                            elem_id="sdtoolkit_history_entry", scale=3)
        rerun = gr.Button("Re-run", variant="primary", elem_id="sdtoolkit_history_rerun", scale=1)
    rerun_status = gr.HTML(elem_id="sdtoolkit_history_rerun_status")
    with gr.Accordion("Recipe stored in a model", open=False):
        choices = model_choices(host, MODEL_KINDS)
        model = gr.Dropdown(label="Model", choices=choices, value=choices[0] if choices else None,
                            elem_id="sdtoolkit_history_model")
        register_picker(model, MODEL_KINDS, tagged=True)
        show = gr.Button("Show recipe", elem_id="sdtoolkit_history_show")
        recipe_note = gr.HTML(elem_id="sdtoolkit_history_recipe_note")
        recipe = gr.JSON(elem_id="sdtoolkit_history_recipe")

    def do_refresh(j, current_entry, current_model):
        host.refresh(None)
        r, n, i = run_list(host, j)
        new = model_choices(host, MODEL_KINDS)
        return (r, n, gr.update(choices=i, value=keep_value(i, current_entry)),
                gr.update(choices=new, value=keep_value(new, current_model)))

    def do_rerun(e, j, progress=gr.Progress()):
        msg = run_rerun(host, e, progress)
        r, n, _ = run_list(host, j)
        return msg, r, n

    def refresh_view(j, current_entry):
        r, n, i = run_list(host, j)
        return r, n, gr.update(choices=i, value=keep_value(i, current_entry))

    # the list is recorded by jobs of every tab and face: re-read after each write and when the page loads
    register_view(refresh_view, [job, entry], [table, status, entry])
    refresh.click(do_refresh, inputs=[job, entry, model], outputs=[table, status, entry, model])
    job.change(do_refresh, inputs=[job, entry, model], outputs=[table, status, entry, model])
    writes(rerun.click(do_rerun, inputs=[entry, job], outputs=[rerun_status, table, status]))
    show.click(lambda c: run_recipe(host, c), inputs=[model], outputs=[recipe_note, recipe])
