"""The LoRA block-weight editor (lora-block-weight's ``lbw=``), a section of the LoRA tools tab.

Built on the merge tab's block editor pieces (:func:`.merge_tab.chart_html`, :func:`.merge_tab.table_text`, the
``LBW`` vocabulary of :mod:`lib_sdtoolkit.arch.blocks`) and on :mod:`lib_sdtoolkit.lora.blocks`, which the
generation (``<lora:...:lbw=...>``) and bake read: pick a LoRA (its architecture is read from its header), a
preset or a list, edit the per-block table (3 decimals), see the chart (block names on the axis, BASE apart), and
take the result: the ``<lora:...>`` / ``<sdtlora:...>`` prompt text, or a line for the Bake list (bake applies the
same block weights).

Everything the editor shows comes from :func:`editor_state` (pure; the tests call it); :func:`build` only wires it.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from .common import register_picker, supported_kwargs
from .merge_tab import chart_html, table_text

AUTO = "auto (from the LoRA)"
#: no preset: the lbw box holds a list (or nothing: no block weights)
NO_PRESET = ""


def architectures() -> List[str]:
    """Every architecture with LoRA blocks (SD1, SD2, SDXL, SDXL-refiner, Flux.1)."""
    from ..arch.blocks import LBW, TABLES

    return list(TABLES[LBW])


def preset_names() -> List[str]:
    from ..lora.blocks import PRESETS

    return list(PRESETS)


def lora_arch(host: Host, lora: Optional[str]) -> Tuple[Optional[str], str]:
    """(architecture of the LoRA ``lora`` from its keys and metadata, or None; a note when it cannot be read)."""
    if not lora:
        return None, ""
    try:
        from ..files import open_model
        from ..lora.network import guess_lora_arch

        with open_model(host.resolve_input(lora, "lora")) as r:
            return guess_lora_arch(r.keys(), dict(r.metadata)), ""
    except SdToolkitError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - shown in the editor
        return None, f"{type(exc).__name__}: {exc}"


def effective_arch(chosen: Optional[str], detected: Optional[str]) -> str:
    """The architecture the editor works in: the one chosen, else the LoRA's, else SD1."""
    if chosen and chosen != AUTO:
        return chosen
    return detected or "SD1"


def preset_spec(preset: Optional[str], arch: str) -> Tuple[str, Optional[str]]:
    """(the lbw box's text for ``preset`` on ``arch``, note). A preset ``arch`` takes is written by name (what
    lora-block-weight users write); a preset of another architecture is carried over by block name and written as
    its list, with the note saying so (``lbw=NAME`` would be refused for this LoRA)."""
    from ..lora.blocks import lbw_list, preset_for

    if not preset:
        return "", None
    weights, note = preset_for(preset, arch)
    return (preset, None) if note is None else (lbw_list(weights, arch), note)


def weights_of(spec: Optional[str], arch: str) -> Optional[Dict[str, float]]:
    """{block: weight} over every block of ``arch`` for the lbw box's text (None: no block weights). Raises
    InvalidInputError as a tag with that ``lbw=`` would be refused."""
    from ..lora.blocks import resolve_block_weights

    return resolve_block_weights(spec, arch)


def range_warnings(values: Dict[str, float]) -> List[str]:
    """Blocks whose weight is outside [0, 1], by name: allowed (lora-block-weight takes any number), but said."""
    from ..lora.blocks import fmt_weight

    neg = [f"{b} = {fmt_weight(v)}" for b, v in values.items() if v < 0]
    big = [f"{b} = {fmt_weight(v)}" for b, v in values.items() if v > 1]
    out = []
    if neg:
        out.append(f"{', '.join(neg)}: below 0, the LoRA's change is subtracted in these blocks.")
    if big:
        out.append(f"{', '.join(big)}: above 1, the LoRA's change is amplified in these blocks.")
    return out


def tag_name(lora: Optional[str]) -> str:
    """The name a prompt tag uses for a LoRA file: its file name without folder and extension (the WebUI's)."""
    return Path(lora or "").stem


def prompt_tags(lora: Optional[str], weight: Any, spec: Optional[str]) -> Tuple[str, str]:
    """(``<lora:NAME:W:lbw=SPEC>``, ``<sdtlora:NAME:W:lbw=SPEC>``); no ``lbw=`` without a spec."""
    from ..lora.blocks import fmt_weight

    if not lora:
        return "", ""
    body = f"{tag_name(lora)}:{fmt_weight(_weight(weight))}" + (f":lbw={spec.strip()}" if (spec or "").strip()
                                                                   else "")
    return f"<lora:{body}>", f"<sdtlora:{body}>"


def bake_line(lora: Optional[str], weight: Any, spec: Optional[str]) -> str:
    """The Bake list's line for this LoRA: ``NAME:W[:lbw=SPEC]`` (NAME as the LoRA list shows it)."""
    from ..lora.blocks import fmt_weight

    if not lora:
        return ""
    line = f"{lora}:{fmt_weight(_weight(weight))}"
    return line + (f":lbw={spec.strip()}" if (spec or "").strip() else "")


def _weight(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 1.0


def editor_state(host: Host, lora: Optional[str], chosen_arch: Optional[str], preset: Optional[str],
                 spec: Optional[str], weight: Any = 1.0) -> Dict[str, Any]:
    """Everything the editor shows for its inputs: ``rows`` ([block, weight] for every block of the architecture,
    BASE first, 3 decimals), ``chart`` (svg html), ``message`` (html: the architecture, the preset's note,
    range warnings, or the error), ``lora_tag`` / ``sdtlora_tag`` (prompt text; empty when the spec is refused),
    ``bake`` (the Bake list's line), ``arch`` and ``weights`` (None: no block weights)."""
    from ..arch.blocks import LBW, convention
    from ..lora.blocks import fmt_weight

    detected, read_note = lora_arch(host, lora)
    arch = effective_arch(chosen_arch, detected)
    conv = convention(LBW, arch)
    notes: List[str] = []
    warns: List[str] = []
    if read_note:
        warns.append(f"{lora}: {read_note}")
    src = "chosen" if chosen_arch and chosen_arch != AUTO else ("read from the LoRA" if detected else "assumed")
    notes.append(f"{arch} ({src}): {len(conv.blocks)} blocks; an lbw list has {conv.describe_lengths()}")
    if detected and arch != detected:
        warns.append(f"This LoRA is a {detected} LoRA; the blocks are {arch}'s (a tag with this list would be "
                     f"read for the model it is used with).")
    out: Dict[str, Any] = {"arch": arch, "weights": None, "lora_tag": "", "sdtlora_tag": "", "bake": ""}
    try:
        weights = weights_of(spec, arch)
    except SdToolkitError as exc:
        out.update(rows=[[b, ""] for b in conv.blocks], chart="",
                   message=_html(notes, warns, error=str(exc)))
        return out
    if preset:
        try:
            text, note = preset_spec(preset, arch)
        except SdToolkitError as exc:
            text, note = None, str(exc)
        if note and (spec or "").strip() == text:
            warns.append(note)
    shown = weights if weights is not None else {b: 1.0 for b in conv.blocks}
    if weights is None:
        notes.append("no lbw: every block at the LoRA's weight (the tag has no lbw=)")
    else:
        warns += range_warnings(weights)
    lo, sdt = prompt_tags(lora, weight, spec)
    out.update(rows=[[b, fmt_weight(v)] for b, v in shown.items()],
               chart=chart_html(shown, label="LoRA weight per block"), message=_html(notes, warns),
               weights=weights, lora_tag=lo, sdtlora_tag=sdt, bake=bake_line(lora, weight, spec))
    return out


def _html(notes: List[str], warns: List[str], error: Optional[str] = None) -> str:
    out = f'<div class="sdtoolkit-hint">{html.escape("; ".join(notes))}</div>'
    out += "".join(f'<div class="sdtoolkit-warn">{html.escape(w)}</div>' for w in warns)
    if error:
        out += f'<div class="sdtoolkit-error">{html.escape(error)}</div>'
    return out


def spec_from_table(rows: Any, arch: str, spec: Optional[str]) -> Optional[str]:
    """The lbw box's new text after an edit of the table, or None when the table says what ``spec`` says already
    (a preset name stays a name; the table a change of the box filled does not write the box back)."""
    from ..lora.blocks import lbw_list

    text = table_text(rows)
    if rows is None or not text.strip():
        return None
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    named: Dict[str, float] = {}
    for row in rows:
        if len(row) < 2 or str(row[0]).strip() == "":
            continue
        try:
            named[str(row[0]).strip()] = float(row[1])
        except (TypeError, ValueError):
            return None  # a cell being typed: wait for a number
    try:
        current = weights_of(spec, arch)
    except SdToolkitError:
        current = None
    rounded = {b: round(v, 3) for b, v in named.items()}
    if current is not None and rounded == {b: round(v, 3) for b, v in current.items()}:
        return None
    if current is None and not (spec or "").strip() and all(v == 1.0 for v in rounded.values()):
        return None  # the all-1 table shown for "no lbw"
    try:
        return lbw_list(named, arch)
    except SdToolkitError:
        return None


def build(host: Host, bake_list: Any = None) -> None:
    """The editor's components (inside the current tab/column). ``bake_list``: the Bake section's LoRA list
    textbox, which "Add to Bake list" appends to."""
    names = [host.display_name(p, "lora") for p in host.list_models("lora")]
    first = editor_state(host, names[0] if names else None, AUTO, NO_PRESET, "", 1.0)
    with gr.Row():
        lora = register_picker(gr.Dropdown(choices=names, value=names[0] if names else None, label="LoRA",
                                           elem_id="sdtoolkit_lora_lbw_file"), ("lora",))
        arch = gr.Dropdown(choices=[AUTO] + architectures(), value=AUTO, label="Blocks of",
                           elem_id="sdtoolkit_lora_lbw_arch")
        preset = gr.Dropdown(choices=[NO_PRESET] + preset_names(), value=NO_PRESET,
                             label="lora-block-weight preset", elem_id="sdtoolkit_lora_lbw_preset")
        weight = gr.Number(value=1.0, label="LoRA weight", elem_id="sdtoolkit_lora_lbw_weight")
    spec = gr.Textbox(label="lbw= (a preset name or one value per block: SD1/SD2 17 or 26, SDXL 12 or 20, Flux.1 "
                            "57 or 58, or lora-block-weight's 61; blank: no block weights); or edit the table",
                      value="",
                      elem_id="sdtoolkit_lora_lbw_spec")
    with gr.Row():
        table = gr.Dataframe(headers=["block", "weight"], datatype=["str", "str"], interactive=True,
                             value=first["rows"], row_count=(1, "dynamic"), col_count=(2, "fixed"),
                             label="Weight per block, 3 decimals", elem_id="sdtoolkit_lora_lbw_table", scale=1)
        with gr.Column(scale=3):
            chart = gr.HTML(first["chart"], elem_id="sdtoolkit_lora_lbw_chart")
            msg = gr.HTML(first["message"], elem_id="sdtoolkit_lora_lbw_msg")
    copy = supported_kwargs(gr.Textbox, show_copy_button=True)
    with gr.Row():
        lora_tag = gr.Textbox(label="Prompt text for the WebUI's Lora (with lora-block-weight)",
                              value=first["lora_tag"], elem_id="sdtoolkit_lora_lbw_tag", **copy)
        sdt_tag = gr.Textbox(label="Prompt text for SD Toolkit's LoRA", value=first["sdtlora_tag"],
                             elem_id="sdtoolkit_lora_lbw_sdt_tag", **copy)
    to_bake = gr.Button("Add to the Bake list", elem_id="sdtoolkit_lora_lbw_to_bake",
                        visible=bake_list is not None)

    def shown(lo, ar, pr, sp, w):
        st = editor_state(host, lo, ar, pr, sp, w)
        return gr.update(value=st["rows"]), st["chart"], st["message"], st["lora_tag"], st["sdtlora_tag"]

    def on_preset(lo, ar, pr, sp, w):
        detected, _ = lora_arch(host, lo)
        try:
            text, _note = preset_spec(pr, effective_arch(ar, detected))
        except SdToolkitError:
            text = sp
        return (text,) + shown(lo, ar, pr, text, w)

    def on_source(lo, ar, pr, sp, w):
        """Another LoRA or architecture: a preset is taken again for it; a typed list stays as typed."""
        return on_preset(lo, ar, pr, sp, w) if pr else (gr.update(),) + shown(lo, ar, pr, sp, w)

    def on_table(rows, lo, ar, sp):
        detected, _ = lora_arch(host, lo)
        new = spec_from_table(rows, effective_arch(ar, detected), sp)
        return gr.update() if new is None or new == (sp or "").strip() else new

    inputs = [lora, arch, preset, spec, weight]
    shown_out = [table, chart, msg, lora_tag, sdt_tag]
    preset.change(on_preset, inputs=inputs, outputs=[spec] + shown_out)
    lora.change(on_source, inputs=inputs, outputs=[spec] + shown_out)
    arch.change(on_source, inputs=inputs, outputs=[spec] + shown_out)
    spec.change(shown, inputs=inputs, outputs=shown_out)
    weight.change(shown, inputs=inputs, outputs=shown_out)
    table.change(on_table, inputs=[table, lora, arch, spec], outputs=[spec])

    if bake_list is not None:
        def add_to_bake(lo, w, sp, current):
            line = bake_line(lo, w, sp)
            if not line:
                return gr.update()
            lines = [x for x in (current or "").splitlines() if x.strip()]
            return "\n".join(lines + [line])

        to_bake.click(add_to_bake, inputs=[lora, weight, spec, bake_list], outputs=[bake_list])


__all__ = ["editor_state", "preset_spec", "spec_from_table", "prompt_tags", "bake_line", "build", "AUTO"]
