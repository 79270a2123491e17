"""Views that show what writes change are re-read when the page loads and after every write.

Found in the real A1111 1.10.1: the WebUI builds its UI once at start-up, so the History tab showed the history of
that moment on every later page (a merge made from the Merge tab, or before a page reload, was missing until the
Refresh button was clicked). Built with gradio's real Blocks on the sample library; the events are the built app's
own dependencies.
"""
from __future__ import annotations

import shutil

from lib_sdtoolkit.host import StandaloneHost
from lib_sdtoolkit.jobs import run
from lib_sdtoolkit.samples import library


def _deps_with_output(demo, comp_id, trigger):
    """(index, dependency) of every event whose outputs hold ``comp_id`` and whose trigger is ``trigger``
    (gradio 3: ``dep["trigger"]``; gradio 4: ``dep["targets"] = [[id, trigger], ...]``)."""
    found = []
    for i, dep in enumerate(demo.config["dependencies"]):
        triggers = {dep.get("trigger")} | {t[1] for t in dep.get("targets", []) if isinstance(t, (list, tuple))}
        if comp_id in dep["outputs"] and trigger in triggers:
            found.append((i, dep))
    return found


def test_history_table_is_reread_on_page_load_and_after_each_write(models_dir, tmp_path):
    from lib_sdtoolkit.ui import build_app

    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    host = StandaloneHost(models_dir=root)
    demo = build_app(host)
    comps = {c["props"].get("elem_id"): c["id"] for c in demo.config["components"]}
    table, entry = comps["sdtoolkit_history_table"], comps["sdtoolkit_history_entry"]

    loads = _deps_with_output(demo, table, "load")
    assert len(loads) == 1, "no page-load event re-reads the History table"
    i, dep = loads[0]
    assert entry in dep["outputs"]
    # every writing button (Merge, Prune, ...) is followed by a re-read of the table
    merge_btn = comps["sdtoolkit_merge_run"]
    merge_deps = [k for k, d in enumerate(demo.config["dependencies"])
                  if merge_btn in [t[0] if isinstance(t, (list, tuple)) else t for t in d.get("targets", [])]]
    followers = _deps_with_output(demo, table, "then")
    assert any(d.get("trigger_after") in merge_deps for _, d in followers), "a merge does not refresh History"

    # a merge written after the UI was built: the load event lists it and picks it as the entry to re-run
    sd15 = root / library.NAMES["sd15"]
    shutil.copyfile(sd15, sd15.with_name("sd15-copy.safetensors"))
    rep = run("merge", host, {"model_a": sd15.name, "model_b": "sd15-copy.safetensors", "alpha": 0.25,
                              "output": "after-build"})
    inputs = [c for c in dep["inputs"]]
    assert len(inputs) == 2                                   # the job filter and the current entry
    rows, note, entries = demo.fns[i].fn("", None)
    assert [r[3] for r in rows] == ["after-build.safetensors"] and rows[0][2] == "merge"
    assert note == ""
    assert entries["choices"] == [rows[0][0]] and entries["value"] == rows[0][0]
    assert rep.name == "after-build.safetensors"
