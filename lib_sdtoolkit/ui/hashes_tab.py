"""Hashes & dedup tab: file hashes (AutoV1/V2/V3, SHA256, BLAKE3, CRC32) with a progress bar, and the duplicate
report as a table with action buttons that ask for confirmation before changing anything."""
from __future__ import annotations

import html
import logging
from typing import Any, Dict, List, Optional, Tuple

import gradio as gr

from ..errors import SdToolkitError
from ..host import Host
from .common import (empty_table, error_html, gradio_progress, human_bytes, model_choices, parse_choice,
                     register_picker, stop_button, writes)

log = logging.getLogger(__name__)

TITLE = "Hashes & dedup"
ELEM_ID = "hashes"
HASH_HEADERS = ["file", "AutoV2", "SHA256", "AutoV1", "AutoV3", "BLAKE3", "CRC32", "from"]


def _dedup_headers() -> List[str]:
    from ..dedup import TABLE_HEADERS

    return list(TABLE_HEADERS)


def hash_request(picked: List[str]):
    """The hash job's request from the dropdown's picks (``[kind] name``)."""
    from ..jobs.faces import ui_request
    from ..jobs.maintenance import HashRequest

    if not picked:
        raise SdToolkitError("pick one or more models first")
    names: List[str] = []
    kinds = set()
    for c in picked:
        k, n = parse_choice(c)
        names.append(n)
        kinds.add(k)
    kind = kinds.pop() if len(kinds) == 1 else None
    return ui_request(HashRequest, {"paths": names, "kind": kind})


def run_hashes(host: Host, picked: List[str], progress: Any = None) -> Tuple[str, Any, Any]:
    from ..files.hashes import BLAKE3_MISSING, blake3_available
    from ..jobs import get

    try:
        res = get("hash").run(host, hash_request(picked), gradio_progress(progress, stop_key="hashes")).to_dict()
    except SdToolkitError as exc:
        return error_html(exc), empty_table(HASH_HEADERS), None
    except Exception as exc:
        log.exception("sdtoolkit: hashing failed")
        return error_html(exc), empty_table(HASH_HEADERS), None
    rows = [[r["name"], r.get("autov2"), r.get("sha256"), r.get("autov1"), r.get("autov3") or "",
             r.get("blake3") or "", r.get("crc32"), r.get("source")] for r in res["results"]]
    msg = f'<div class="sdtoolkit-ok">{len(rows)} files hashed'
    if res["webui_cache_entries"]:
        msg += f'; {res["webui_cache_entries"]} entries written to the WebUI hash cache'
    msg += "</div>"
    if res.get("cache_warning"):
        msg += f'<div class="sdtoolkit-warning">{html.escape(res["cache_warning"])}</div>'
    if not blake3_available():
        msg += f'<div class="sdtoolkit-warn">BLAKE3 left out: {html.escape(BLAKE3_MISSING)}</div>'
    for p in res["problems"]:
        msg += error_html(SdToolkitError(f'{p["path"]}: {p["reason"]}'))
    return msg, (rows or empty_table(HASH_HEADERS)), res


def _summary(res: Dict[str, Any]) -> str:
    n = len(res["groups"])
    out = (f'<div class="sdtoolkit-ok">{res["files_scanned"]} files scanned ({res["files_read"]} read, the rest '
           f'from the cache): {n} duplicate groups, {human_bytes(res["gain_bytes"])} to gain</div>')
    if res.get("cache_warning"):
        out += f'<div class="sdtoolkit-warning">{html.escape(res["cache_warning"])}</div>'
    for p in res["problems"]:
        out += error_html(SdToolkitError(f'{p["path"]}: {p["reason"]}'))
    for a in res.get("actions", []):
        why = f' ({html.escape(a["reason"])})' if a.get("reason") else ""
        out += f'<div class="sdtoolkit-action">{html.escape(a["action"])}: {html.escape(a["path"])}{why}</div>'
    return out


def dedup_request(kind: str, folders: str, action: str = "report", to: Optional[str] = None,
                  confirm: bool = False, keep: Optional[List[str]] = None):
    """The dedup job's request from the tab's values (folders: a comma-separated text box; keep: the copies the
    user chose to keep, one per group)."""
    from ..jobs.faces import ui_request
    from ..jobs.maintenance import DedupRequest

    names = [f.strip() for f in (folders or "").split(",") if f.strip()] or None
    return ui_request(DedupRequest, {"kind": kind, "folders": names, "action": action, "to": to or None,
                                     "confirm": bool(confirm), "keep": list(keep or []) or None})


def keep_choices(res: Optional[Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    """(every file of every duplicate group, the keepers) of a dedup result, for the "copies to keep" picker."""
    if not res:
        return [], []
    files = [f for g in res.get("groups", []) for f in [g["keeper"]] + list(g["duplicates"])]
    return files, [g["keeper"] for g in res.get("groups", [])]


def one_per_group(picked: List[str], before: List[str], groups: List[List[str]]) -> List[str]:
    """The "copies to keep" selection with at most one file per group: where a group now has two, the one just
    added wins (a pick replaces its group's keeper)."""
    picked = list(picked or [])
    added = [p for p in picked if p not in (before or [])]
    drop = set()
    for g in groups or []:
        mine = [p for p in picked if p in g]
        if len(mine) > 1:
            winner = next((p for p in mine if p in added), mine[-1])
            drop.update(p for p in mine if p != winner)
    return [p for p in picked if p not in drop]


def run_dedup(host: Host, kind: str, folders: str, action: str = "report", to: Optional[str] = None,
              confirm: bool = False, progress: Any = None,
              keep: Optional[List[str]] = None) -> Tuple[str, List[List[Any]], Any]:
    from ..jobs import get

    try:
        req = dedup_request(kind, folders, action, to, confirm, keep)
        res = get("dedup").run(host, req, gradio_progress(progress, stop_key="hashes")).to_dict()
    except SdToolkitError as exc:
        return error_html(exc), empty_table(_dedup_headers()), None
    except Exception as exc:
        log.exception("sdtoolkit: dedup failed")
        return error_html(exc), empty_table(_dedup_headers()), None
    return _summary(res), res["table"]["rows"] or empty_table(_dedup_headers()), res


def build(host: Host) -> None:
    from ..dedup import TABLE_HEADERS

    all_kinds = ("checkpoint", "vae", "lora", "controlnet")
    choices = model_choices(host, all_kinds)
    gr.Markdown("### File hashes")
    with gr.Row(elem_classes=["sdtoolkit-picker"]):
        files = register_picker(gr.Dropdown(label="Models", choices=choices, multiselect=True,
                                            value=choices[:1], elem_id="sdtoolkit_hashes_files", scale=5),
                                all_kinds, tagged=True, multiselect=True)
        refresh_btn = gr.Button("Refresh", elem_id="sdtoolkit_hashes_refresh", elem_classes=["sdtoolkit-tool"],
                                scale=1, min_width=90)
    with gr.Row():
        hash_btn = gr.Button("Compute hashes", variant="primary", elem_id="sdtoolkit_hashes_run")
    hash_status = gr.HTML(elem_id="sdtoolkit_hashes_status")
    hash_table = gr.Dataframe(value=empty_table(HASH_HEADERS), headers=HASH_HEADERS, interactive=False,
                              elem_id="sdtoolkit_hashes_table",
                              label="Hashes (AutoV2 is what the WebUI shows; AutoV3 only for .safetensors)")

    gr.Markdown("### Duplicates")
    with gr.Row():
        kind = gr.Radio(["vae", "checkpoint", "lora", "any"], value="vae", label="Kind",
                        elem_id="sdtoolkit_dedup_kind")
        folders = gr.Textbox(label="Folders (comma separated, under the model folders; empty: the kind's folders)",
                             lines=1, elem_id="sdtoolkit_dedup_folders", scale=3)
    scan_btn = gr.Button("Scan for duplicates", variant="primary", elem_id="sdtoolkit_dedup_scan")
    dedup_status = gr.HTML(elem_id="sdtoolkit_dedup_status")
    stop_button("hashes", dedup_status)
    dedup_table = gr.Dataframe(value=empty_table(TABLE_HEADERS), headers=TABLE_HEADERS, interactive=False,
                               elem_id="sdtoolkit_dedup_table",
                               label="Duplicate groups (keep = the copy that stays)")
    keep = gr.Dropdown(label="Copies to keep, one per group (set from the scan: .safetensors first, then the "
                             "shortest name; pick another copy of a group to keep it instead)", choices=[],
                       multiselect=True, elem_id="sdtoolkit_dedup_keep")
    with gr.Row():
        link_btn = gr.Button("Replace byte duplicates with hard links...", elem_id="sdtoolkit_dedup_hardlink")
        to = gr.Textbox(label="Move duplicates to (folder under the model folders)", lines=1,
                        elem_id="sdtoolkit_dedup_to", scale=2)
        move_btn = gr.Button("Move duplicates...", elem_id="sdtoolkit_dedup_move")
    pending = gr.State("")
    with gr.Group(visible=False, elem_id="sdtoolkit_dedup_confirm_box") as confirm_box:
        confirm_text = gr.HTML(elem_id="sdtoolkit_dedup_confirm_text")
        with gr.Row():
            confirm_btn = gr.Button("Confirm", variant="stop", elem_id="sdtoolkit_dedup_confirm")
            cancel_btn = gr.Button("Cancel", elem_id="sdtoolkit_dedup_cancel")
    with gr.Accordion("JSON", open=False):
        dedup_json = gr.JSON(elem_id="sdtoolkit_dedup_json")

    def do_refresh(current):
        host.refresh(None)
        new = model_choices(host, all_kinds)
        return gr.update(choices=new, value=[c for c in (current or []) if c in new])

    def do_hash(picked, progress=gr.Progress()):
        return run_hashes(host, picked, progress)

    groups_state = gr.State([])
    kept_state = gr.State([])

    def do_scan(k, f, kept, groups, progress=gr.Progress()):
        # the choices of an earlier scan still listed in this one are kept; others (another kind) are not sent
        kept = [p for p in (kept or []) if any(p in g for g in groups or [])]
        msg, rows, res = run_dedup(host, k, f, progress=progress, keep=kept)
        if res is None:
            return msg, rows, res, gr.update(), groups, kept
        everything, keepers = keep_choices(res)
        new_groups = [[g["keeper"]] + list(g["duplicates"]) for g in res.get("groups", [])]
        return msg, rows, res, gr.update(choices=everything, value=keepers), new_groups, keepers

    def on_keep(picked, before, groups):
        fixed = one_per_group(picked, before, groups)
        return (gr.update() if fixed == list(picked or []) else gr.update(value=fixed)), fixed

    def ask(action: str, k: str, f: str, target: str, kept: List[str]):
        what = ("replace every byte-identical duplicate with a hard link to the kept copy (same filesystem only; "
                "files with the same weights but different bytes are left alone)" if action == "hardlink" else
                f"move every duplicate into '{html.escape(target or '(no folder given)')}'")
        keeping = (f" Kept: {html.escape(', '.join(kept))}." if kept else "")
        text = (f'<div class="sdtoolkit-warn">This will {what} for kind <b>{html.escape(k)}</b>'
                f'{" in " + html.escape(f) if f else ""}.{keeping} Nothing is deleted. Continue?</div>')
        return action, gr.update(visible=True), text

    def do_confirm(action, k, f, target, kept, progress=gr.Progress()):
        if action not in ("hardlink", "move"):
            return gr.update(visible=False), "", gr.update(), None, ""
        msg, rows, res = run_dedup(host, k, f, action, target if action == "move" else None, True, progress,
                                   keep=kept)
        return gr.update(visible=False), msg, rows, res, ""

    refresh_btn.click(do_refresh, inputs=[files], outputs=[files])
    hash_btn.click(do_hash, inputs=[files], outputs=[hash_status, hash_table, dedup_json])
    scan_btn.click(do_scan, inputs=[kind, folders, keep, groups_state],
                   outputs=[dedup_status, dedup_table, dedup_json, keep, groups_state, kept_state])
    keep.change(on_keep, inputs=[keep, kept_state, groups_state], outputs=[keep, kept_state])
    link_btn.click(lambda k, f, t, kp: ask("hardlink", k, f, t, kp), inputs=[kind, folders, to, keep],
                   outputs=[pending, confirm_box, confirm_text])
    move_btn.click(lambda k, f, t, kp: ask("move", k, f, t, kp), inputs=[kind, folders, to, keep],
                   outputs=[pending, confirm_box, confirm_text])
    cancel_btn.click(lambda: ("", gr.update(visible=False)), outputs=[pending, confirm_box])
    writes(confirm_btn.click(do_confirm, inputs=[pending, kind, folders, to, keep],
                             outputs=[confirm_box, dedup_status, dedup_table, dedup_json, pending]))
