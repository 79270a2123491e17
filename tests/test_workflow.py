"""Merge workflow (#16): model similarity per block (``compare``) and the recipe history (``history``,
``history-rerun``, ``recipe``), through the job and all three faces.

References are independent of the code under test: the similarity figures are recomputed here with plain torch
from ``safetensors.torch.load_file``; output hashes with ``hashlib``; re-runs compared byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_sdtoolkit import jobs
from lib_sdtoolkit.errors import ArchitectureError, InvalidInputError
from lib_sdtoolkit.host import LocalHost, StandaloneHost

UNET = "model.diffusion_model."
CHANGED = UNET + "input_blocks.4."
SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(fixture_files, tmp_path_factory):
    """A (the SD1 fixture), A4 (A with every IN04 tensor changed), A16 (A in fp16)."""
    d = tmp_path_factory.mktemp("workflow")
    a = fixture_files["sd1"]
    sd = load_file(a)
    g = torch.Generator().manual_seed(7)
    for k in sd:
        if k.startswith(CHANGED) and sd[k].is_floating_point():
            sd[k] = sd[k] + 0.05 * torch.randn(sd[k].shape, generator=g, dtype=sd[k].dtype)
    a4 = d / "a4.safetensors"
    save_file(sd, a4)
    return {"a": a, "a4": a4, "a16": fixture_files["sd1_fp16"], "vae": fixture_files["vae"],
            "sdxl": fixture_files["sdxl"], "dir": d}


def _reference(pa: Path, pb: Path, keep) -> tuple:
    """cosine and relative L2 over the float tensors whose key ``keep`` accepts, in float64."""
    sa, sb = load_file(pa), load_file(pb)
    ks = [k for k in sa if keep(k) and sa[k].is_floating_point()]
    va = torch.cat([sa[k].reshape(-1).double() for k in ks])
    vb = torch.cat([sb[k].reshape(-1).double() for k in ks])
    cos = float(torch.dot(va, vb) / (va.norm() * vb.norm()))
    rel = float((va - vb).norm() / va.norm())
    return cos, rel, len(ks)


def test_one_changed_block_is_the_only_one_that_differs(files):
    rep = jobs.run("compare", LocalHost(), {"models": [str(files["a"]), str(files["a4"])]}).to_dict()
    assert rep["groups"] == SD1_BLOCKS + ["text_encoder", "vae"]
    (pair,) = rep["pairs"]
    for g, r in pair["groups"].items():
        if g == "IN04":
            continue
        assert r["equal"] and r["cosine"] == 1.0 and r["rel_l2"] == 0.0, g
    r = pair["groups"]["IN04"]
    cos, rel, n = _reference(files["a"], files["a4"], lambda k: k.startswith(CHANGED))
    assert not r["equal"] and r["keys"] == n
    assert r["cosine"] == pytest.approx(cos, rel=1e-9) and r["cosine"] < 1.0
    assert r["rel_l2"] == pytest.approx(rel, rel=1e-9) and r["rel_l2"] > 0.01
    # the whole model, against the same reference over every float key
    cos_all, rel_all, _ = _reference(files["a"], files["a4"], lambda k: True)
    assert pair["overall"]["cosine"] == pytest.approx(cos_all, rel=1e-9)
    assert pair["overall"]["rel_l2"] == pytest.approx(rel_all, rel=1e-9)


def test_pairwise_matrix_dtypes_and_a_vae_file_against_a_checkpoint(files):
    rep = jobs.run("compare", LocalHost(), {"models": [str(files["a"]), str(files["a4"]), str(files["a16"])]})
    d = rep.to_dict()
    assert [(p["a"], p["b"]) for p in d["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    fp16 = d["pairs"][1]
    # the same weights rounded to fp16: not identical, but the same direction to fp16's precision
    cos, rel, _ = _reference(files["a"], files["a16"], lambda k: k.startswith(UNET))
    te = fp16["groups"]["text_encoder"]
    assert not te["equal"] and 0.999999 < te["cosine"] < 1.0 and 0 < te["rel_l2"] < 1e-3
    assert "differ in" in rep.summary() and "a4.safetensors" in rep.summary()
    # "is this VAE the same as that one": a bare VAE file against the checkpoint's first_stage_model.*
    v = jobs.run("compare", LocalHost(), {"models": [str(files["a"]), str(files["vae"])]}).to_dict()
    assert v["groups"] == ["vae"] and v["pairs"][0]["groups"]["vae"]["equal"]
    assert v["missing"][1] > 0  # the VAE file lacks the UNet and text encoder: counted, not compared


def test_models_of_two_architectures_are_refused_naming_both(files):
    with pytest.raises(ArchitectureError, match=r"sd1\.safetensors is SD1.*sdxl\.safetensors is SDXL"):
        jobs.run("compare", LocalHost(), {"models": [str(files["a"]), str(files["sdxl"])]})
    with pytest.raises(InvalidInputError, match="two or more"):
        jobs.run("compare", LocalHost(), {"models": [str(files["a"])]})


def test_cli_table_and_json(files, capsys):
    from lib_sdtoolkit.cli import main

    assert main(["compare", str(files["a"]), str(files["a4"])]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("IN04"))
    assert row.split()[-1] == "no"
    assert next(line for line in out.splitlines() if line.startswith("IN05")).split()[-1] == "yes"
    assert main(["compare", str(files["a"]), str(files["a4"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pairs"][0]["groups"]["IN04"]["equal"] is False


# ------------------------------------------------------------------------------------------------ the faces
@pytest.fixture(scope="module")
def app(files, tmp_path_factory):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.server import make_router

    root = tmp_path_factory.mktemp("workflow_app") / "models"
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet"):
        (root / sub).mkdir(parents=True)
    shutil.copyfile(files["a"], root / "Stable-diffusion" / "a.safetensors")
    shutil.copyfile(files["a4"], root / "Stable-diffusion" / "a4.safetensors")
    host = StandaloneHost(models_dir=root)
    api = FastAPI()
    api.include_router(make_router(host, strict=True))
    return {"client": TestClient(api), "host": host, "root": root}


def test_compare_is_the_same_from_the_api_and_the_tab(app, files):
    from lib_sdtoolkit.ui.compare_tab import heatmap_html, run_compare

    r = app["client"].post("/sdtoolkit/v1/compare", json={"models": ["a", "a4.safetensors"]})
    assert r.status_code == 200, r.text
    api = r.json()
    assert api["names"] == ["a.safetensors", "a4.safetensors"]
    assert api["files"] == api["names"]  # the API never shows the server's paths
    cli = jobs.run("compare", LocalHost(), {"models": [str(files["a"]), str(files["a4"])]}).to_dict()
    assert api["pairs"] == cli["pairs"] and api["groups"] == cli["groups"]
    heat, rows, text, js = run_compare(app["host"], ["[checkpoint] a.safetensors", "[checkpoint] a4.safetensors"],
                                       "")
    assert js["pairs"] == api["pairs"]
    assert [r_[1] for r_ in rows if r_[4] == "no"] == ["IN04"]
    assert heat == heatmap_html(js) and ">IN04<" in heat and "#ffffff" in heat
    # bad input is a message, not a traceback
    heat, _, text, js = run_compare(app["host"], ["[checkpoint] a.safetensors"], "")
    assert js is None and "two or more" in text


# ------------------------------------------------------------------------------------------------ history
def test_merge_and_prune_are_recorded_and_a_rerun_is_byte_identical(files, tmp_path):
    host = LocalHost()
    out = tmp_path / "m.safetensors"
    jobs.run("merge", host, {"model_a": str(files["a"]), "model_b": str(files["a4"]), "alpha": 0.3,
                             "output": str(out)})
    jobs.run("prune", host, {"path": str(files["a"]), "output": str(tmp_path / "p.safetensors")})
    lines = (tmp_path / "sdtoolkit-history.jsonl").read_text().splitlines()
    assert [json.loads(x)["job"] for x in lines] == ["merge", "prune"]
    entry = json.loads(lines[0])
    assert entry["sha256"] == _sha(out) and entry["output"] == "m.safetensors"
    assert entry["request"]["model_a"] == str(Path(files["a"]).resolve()) and entry["request"]["alpha"] == 0.3
    assert entry["input_sha256"]["A"] == _sha(files["a"])

    (tmp_path / "sdtoolkit-history.jsonl").open("a").write("{not json\n")  # a damaged line is skipped, counted
    listed = jobs.run("history", host, {"folders": [str(tmp_path)]})
    assert sorted(e["job"] for e in listed.entries) == ["merge", "prune"]
    assert listed.skipped_lines == 1
    assert [e["id"] for e in jobs.run("history", host, {"folders": [str(tmp_path)], "job_name": "prune"}).entries] \
        == [json.loads(lines[1])["id"]]

    cwd = os.getcwd()
    os.chdir(tmp_path.parent)  # the re-run starts elsewhere: the recorded paths are absolute
    try:
        rep = jobs.run("history-rerun", host, {"entry": entry["id"][:6], "folders": [str(tmp_path)]})
    finally:
        os.chdir(cwd)
    again = tmp_path / f"m.rerun-{entry['id'][:6]}.safetensors"
    assert again.read_bytes() == out.read_bytes()
    assert rep.identical is True and rep.sha256 == entry["sha256"]
    pr = json.loads(lines[1])
    rep2 = jobs.run("history-rerun", host, {"entry": pr["id"], "folders": [str(tmp_path)]})
    assert rep2.identical is True
    assert (tmp_path / f"p.rerun-{pr['id'][:6]}.safetensors").read_bytes() == \
        (tmp_path / "p.safetensors").read_bytes()
    with pytest.raises(InvalidInputError, match="no history entry"):
        jobs.run("history-rerun", host, {"entry": "ffffffffff", "folders": [str(tmp_path)]})


def test_history_and_recipe_through_the_api_and_the_tab(app):
    from lib_sdtoolkit.ui import history_tab

    c = app["client"]
    r = c.post("/sdtoolkit/v1/merge", json={"model_a": "a", "model_b": "a4", "alpha": 0.3,
                                            "output": "hist.safetensors"})
    assert r.status_code == 200, r.text
    hist = c.post("/sdtoolkit/v1/history", json={"job_name": "merge"})
    assert hist.status_code == 200, hist.text
    (entry,) = [e for e in hist.json()["entries"] if e["output"] == "hist.safetensors"]
    assert entry["request"]["model_a"] == "a"  # as the client named it
    assert not str(entry["folder"]).startswith("/")  # the API shows names, not the server's paths
    rr = c.post("/sdtoolkit/v1/history/rerun", json={"entry": entry["id"]})
    assert rr.status_code == 200, rr.text
    assert rr.json()["identical"] is True
    sd = app["root"] / "Stable-diffusion"
    assert (sd / f"hist.rerun-{entry['id'][:6]}.safetensors").read_bytes() == (sd / "hist.safetensors").read_bytes()
    rec = c.post("/sdtoolkit/v1/recipe", json={"model": "hist"})
    assert rec.status_code == 200, rec.text
    recipe = rec.json()["recipes"]["sd_merge_recipe"]
    assert recipe["multiplier"] == 0.3 and recipe["interp_method"] == "Weighted sum"
    # the tab's handlers: the list, a re-run, the recipe
    rows, note, ids = history_tab.run_list(app["host"], "merge")
    assert entry["id"] in ids and note == ""
    msg = history_tab.run_rerun(app["host"], entry["id"])
    assert "exists" in msg  # a second re-run refuses to replace the first one's file
    text, recipes = history_tab.run_recipe(app["host"], "[checkpoint] hist.safetensors")
    assert recipes["sd_merge_recipe"]["multiplier"] == 0.3 and text == ""
    # the gate: folders outside the model folders are refused
    assert c.post("/sdtoolkit/v1/history", json={"folders": ["../../etc"]}).status_code == 403


def test_a_history_that_cannot_be_written_does_not_fail_the_merge(files, tmp_path):
    (tmp_path / "sdtoolkit-history.jsonl").mkdir()  # the history file cannot be opened (a folder in its place)
    out = tmp_path / "m.safetensors"
    rep = jobs.run("merge", LocalHost(), {"model_a": str(files["a"]), "model_b": str(files["a4"]),
                                          "output": str(out)})
    assert out.is_file() and rep.to_dict()["output"] == str(out)
    assert (tmp_path / "sdtoolkit-history.jsonl").is_dir() and not any((tmp_path / "sdtoolkit-history.jsonl").iterdir())


def test_rel_l2_has_no_infinity_in_json():
    from lib_sdtoolkit.compare import _Acc

    acc = _Acc(na=0.0, nb=4.0, dd=4.0, equal=False, keys=1, elements=1)
    r = acc.result()
    assert r["rel_l2"] is None and r["cosine"] == 0.0
    json.dumps(r, allow_nan=False)
    assert not math.isnan(_Acc(dot=1.0, na=1.0, nb=1.0, dd=0.0, equal=False).result()["cosine"])
