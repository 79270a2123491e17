"""Compare tab: how related two or more models are, per merge block and component (the ``compare`` job).

A heat map (rows: blocks and components; columns: pairs; the colour is the relative L2 difference on a log scale,
white = identical) and the table of figures. Plain HTML, so it renders the same in gradio 3.41 and 4.x."""
from __future__ import annotations

import html
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import Host
from .common import (empty_table, error_html, gradio_progress, model_choices, parse_choice,
                     register_picker)

log = logging.getLogger(__name__)

TITLE = "Compare"
ELEM_ID = "compare"
KINDS = ("checkpoint", "vae")
TABLE_HEADERS = ["pair", "group", "cosine", "rel L2", "same", "keys"]


def _colour(rel: Optional[float], equal: bool) -> str:
    """White for identical; then from pale yellow (rel L2 1e-6) to deep red (rel L2 >= 1), log scale."""
    if equal:
        return "#ffffff"
    if rel is None:
        return "#7f0000"
    t = 0.0 if rel <= 1e-6 else min(1.0, (math.log10(rel) + 6) / 6)
    r = int(255 - 128 * t)
    g = int(245 * (1 - t) ** 1.5)
    b = int(200 * (1 - t) ** 3)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_html(report: Dict[str, Any]) -> str:
    names = report["names"]
    pairs = report["pairs"]
    cols = [(p, f"{names[p['a']]} vs {names[p['b']]}") for p in pairs]
    head = "".join(f'<th class="sdtoolkit-heat-col" title="{html.escape(t)}">{html.escape(_short(t))}</th>'
                   for _, t in cols)
    rows = []
    for g in report["groups"] + ["all"]:
        cells = []
        for p, _ in cols:
            r = p["overall"] if g == "all" else p["groups"].get(g)
            if r is None:
                cells.append('<td class="sdtoolkit-heat-na">-</td>')
                continue
            rel = r["rel_l2"]
            text = "same" if r["equal"] else f"{r['cosine']:.6f}"
            tip = f"cosine {r['cosine']:.8f}, rel L2 {'n/a' if rel is None else format(rel, '.3g')}, {r['keys']} keys"
            cells.append(f'<td style="background:{_colour(rel, r["equal"])};color:#000" title="{html.escape(tip)}">'
                         f'{text}</td>')
        cls = ' class="sdtoolkit-heat-all"' if g == "all" else ""
        rows.append(f"<tr{cls}><th>{html.escape(g)}</th>{''.join(cells)}</tr>")
    legend = ('<div class="sdtoolkit-hint">Cells: cosine similarity (1 = same direction); colour: relative L2 '
              'difference |A-B|/|A| on a log scale, white = identical values, pale = 1e-6, deep red = 1 or more.</div>')
    return (f'<div class="sdtoolkit-heat"><table id="sdtoolkit_compare_heatmap"><tr><th>block</th>{head}</tr>'
            f'{"".join(rows)}</table>{legend}</div>')


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def table_rows(report: Dict[str, Any]) -> List[List[Any]]:
    names = report["names"]
    rows: List[List[Any]] = []
    for p in report["pairs"]:
        pair = f"{names[p['a']]} vs {names[p['b']]}"
        for g in report["groups"]:
            r = p["groups"].get(g)
            if r is not None:
                rel = None if r["rel_l2"] is None else float(f"{r['rel_l2']:.4g}")
                rows.append([pair, g, round(r["cosine"], 8), rel, "yes" if r["equal"] else "no", r["keys"]])
    return rows


def run_compare(host: Host, choices: Optional[Sequence[str]], paths: str, progress: Any = None
                ) -> Tuple[str, Any, str, Any]:
    """Click handler: (heat map html, table, text, json)."""
    from ..jobs import get
    from ..jobs.compare import CompareRequest
    from ..jobs.faces import ui_request

    try:
        names: List[str] = [parse_choice(c)[1] for c in (choices or [])]
        names += [p.strip() for p in (paths or "").splitlines() if p.strip()]
        if len(names) < 2:
            raise InvalidInputError("pick two or more models (or type their names, one per line)")
        rep = get("compare").run(host, ui_request(CompareRequest, {"models": names}), gradio_progress(progress))
        d = rep.to_dict()
        return heatmap_html(d), table_rows(d), rep.summary(), d
    except SdToolkitError as exc:
        return error_html(exc), empty_table(TABLE_HEADERS), str(exc), None
    except Exception as exc:  # a bug: show it rather than a silent spinner
        log.exception("sdtoolkit: compare failed")
        return error_html(exc), empty_table(TABLE_HEADERS), f"{type(exc).__name__}: {exc}", None


def build(host: Host) -> None:
    choices = model_choices(host, KINDS)
    gr.Markdown("Per merge block (BASE, IN00..OUT11, Flux's blocks) and per component (text encoders, VAE): the "
                "cosine similarity and relative L2 difference of the weights. Is this a merge of X and Y? Which "
                "blocks did a fine-tune change? Is this VAE the same as that one?", elem_classes=["sdtoolkit-hint"])
    with gr.Row(elem_classes=["sdtoolkit-picker"]):
        models = gr.Dropdown(label="Models (two or more)", choices=choices, value=choices[:2], multiselect=True,
                             elem_id="sdtoolkit_compare_models", scale=5)
        register_picker(models, KINDS, tagged=True, multiselect=True)
        refresh = gr.Button("Refresh", elem_id="sdtoolkit_compare_refresh", elem_classes=["sdtoolkit-tool"],
                            scale=1, min_width=90)
    paths = gr.Textbox(label="...and/or names / paths under the model folders, one per line", lines=2,
                       elem_id="sdtoolkit_compare_paths")
    run_btn = gr.Button("Compare", variant="primary", elem_id="sdtoolkit_compare_run")
    heat = gr.HTML(elem_id="sdtoolkit_compare_heat")
    table = gr.Dataframe(value=empty_table(TABLE_HEADERS), headers=TABLE_HEADERS, interactive=False,
                         datatype=["str", "str", "number", "number", "str", "number"],
                         elem_id="sdtoolkit_compare_table", label="Figures")
    with gr.Accordion("Text", open=False):
        text = gr.Textbox(lines=12, max_lines=60, show_label=False, interactive=False,
                          elem_id="sdtoolkit_compare_text", elem_classes=["sdtoolkit-mono"])
    with gr.Accordion("JSON", open=False):
        js = gr.JSON(elem_id="sdtoolkit_compare_json")

    def do_refresh(current: Optional[List[str]]):
        host.refresh(None)
        new = model_choices(host, KINDS)
        return gr.update(choices=new, value=[c for c in (current or []) if c in new])

    def do_compare(chosen, typed, progress=gr.Progress()):
        return run_compare(host, chosen, typed, progress)

    refresh.click(do_refresh, inputs=[models], outputs=[models])
    run_btn.click(do_compare, inputs=[models, paths], outputs=[heat, table, text, js])
