"""The sample library (``serve --sample``) and the faces built on it (issue 15, items 1-6): every file is what its
name says (checked by the toolkit's detectors and by independent computations), the constructed VAE decodes to the
encoded image, every tab's default action works on it, Stop leaves nothing behind, and the pickers, block editor,
method-aware merge form, dedup's choice of the kept copy and serve's busy-port message behave.

One library per module (written once, ~10 s of CPU); each test works on its own files or a copy.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lib_sdtoolkit.errors import Cancelled, InvalidInputError
from lib_sdtoolkit.host import StandaloneHost
from lib_sdtoolkit.jobs import run
from lib_sdtoolkit.samples import library


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("samplelib") / "models"
    steps = []
    paths = library.write_sample_library(root, lambda name, done, total: steps.append((name, done, total)))
    assert [d for _, d, _ in steps] == list(range(1, len(library.NAMES) + 1))
    return root, paths


@pytest.fixture()
def host(lib):
    return StandaloneHost(models_dir=lib[0])


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _psnr_corr(a: np.ndarray, b: np.ndarray):
    a, b = a.astype(np.float64), b.astype(np.float64)
    mse = ((a - b) ** 2).mean()
    return 10 * np.log10(255.0 ** 2 / mse), float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------------------ the files
def test_every_sample_file_is_what_its_name_says(lib, host):
    from lib_sdtoolkit.arch import detect
    from lib_sdtoolkit.controlnet.models import load_control_model
    from lib_sdtoolkit.files import read_infos

    root, paths = lib
    assert set(paths) == set(library.NAMES) and all(p.is_file() for p in paths.values())
    arch = {n: detect(read_infos(paths[n])[1]).architecture for n in ("sd15", "sd15-finetune", "sdxl")}
    assert arch == {"sd15": "SD1", "sd15-finetune": "SD1", "sdxl": "SDXL"}
    # two of one family in the checkpoint list, so Merge's default pair (first two entries) is mergeable
    ckpts = [host.display_name(p, "checkpoint") for p in host.list_models("checkpoint")]
    assert ckpts[:2] == ["sd15-tiny-finetune.safetensors", "sd15-tiny.safetensors"]
    assert paths["vae"].read_bytes() == paths["vae-copy"].read_bytes()
    cn = load_control_model(paths["controlnet"])
    assert cn is not None
    assert [p.name for p in host.list_models("controlnet")] == [paths["controlnet"].name]
    rep = run("lora-inspect", host, {"lora": "sample-lora-sd15"}).to_dict()
    assert rep and "sample-lora-sd15" in str(rep)


def test_tiny_layouts_shipped_as_data_equal_the_real_modules():
    """The data the library writes from is what factory.key_specs computes from the real ldm / diffusers /
    transformers modules (regenerate with ``python -m lib_sdtoolkit.samples.tiny_layouts``)."""
    from lib_sdtoolkit.samples import tiny_layouts

    assert tiny_layouts.data_bytes(tiny_layouts.generate()) == tiny_layouts.DATA.read_bytes()


def test_sample_sd1_checkpoint_has_the_factory_values(lib):
    """Same tensors as factory.build_state_dict(SD1, seed 1, fp16) apart from the constructed VAE."""
    from safetensors.torch import load_file

    from lib_sdtoolkit.samples import factory

    ref = factory.build_state_dict("SD1", "tiny", seed=1, dtype=torch.float16)
    got = load_file(str(lib[1]["sd15"]))
    assert sorted(got) == sorted(ref)
    for k in sorted(got):
        if not k.startswith("first_stage_model."):
            assert torch.equal(got[k], ref[k]), k


def test_constructed_vae_decodes_the_sample_latent_to_the_sample_image(lib, host):
    """Through the vae-decode job, tiled (128 px tiles, so GroupNorm statistics are gathered over several tiles):
    the decode is recognisably the sample image, checked against the PNG with numpy (PSNR and correlation)."""
    from PIL import Image

    root, paths = lib
    want = np.asarray(Image.open(paths["image"]).convert("RGB"))
    lat = base64.b64encode(paths["latent"].read_bytes()).decode()  # sent as data, as the tab and API do
    rep = run("vae-decode", host, {"vae": "vae-tiny", "latent_safetensors_b64": lat, "tile_size": 128,
                                   "device": "cpu"})
    got = np.asarray(rep.image.convert("RGB"))
    assert got.shape == want.shape
    psnr, corr = _psnr_corr(got, want)
    assert psnr > 20 and corr > 0.9, (psnr, corr)
    # the SDXL sample's VAE is the factory's random one, same layout: nothing like it (the check can fail)
    rnd = run("vae-decode", host, {"vae": "sdxl-tiny", "latent_safetensors_b64": lat, "device": "cpu", "full": True,
                                   "scaling_factor": 0.18215})
    _, rnd_corr = _psnr_corr(np.asarray(rnd.image.convert("RGB")), want)
    assert abs(rnd_corr) < 0.5, rnd_corr


def test_vae_encode_then_decode_of_another_image_keeps_it_recognisable(lib, host):
    from PIL import Image, ImageOps

    img = ImageOps.mirror(Image.open(lib[1]["image"]).convert("RGB")).rotate(180)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    enc = run("vae-encode", host, {"vae": "vae-tiny", "image_b64": base64.b64encode(buf.getvalue()).decode(),
                                   "device": "cpu"})
    dec = run("vae-decode", host, {"vae": "vae-tiny", "latent_safetensors_b64": base64.b64encode(enc.data).decode(),
                                   "device": "cpu"})
    _, corr = _psnr_corr(np.asarray(dec.image.convert("RGB")), np.asarray(img))
    assert corr > 0.9, corr


# ------------------------------------------------------------------------------------------------ defaults work
def test_default_merge_works_and_the_sdxl_pair_is_refused(lib, tmp_path):
    from lib_sdtoolkit.ui import merge_tab

    root = tmp_path / "m"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    ck = merge_tab.checkpoint_choices(host)
    base = dict(model_c="", method="weighted_sum", alpha=0.5, beta=0.2, blocks="", base_alpha="", dtype="fp16",
                keep_ema=False, fix_position_ids=False, bake_vae="None", discard="", seed=0, device="default",
                allow_extrapolation=False, output="", overwrite=False)
    html_, text, rep = merge_tab.run_merge(host, dict(base, model_a=ck[0], model_b=ck[1]))
    assert rep is not None, text
    assert rep["name"] in merge_tab.checkpoint_choices(host)
    html_, text, rep = merge_tab.run_merge(host, dict(base, model_a=ck[0], model_b="sdxl-tiny.safetensors"))
    assert rep is None and "SDXL" in text


def test_default_prune_of_the_training_output_writes_a_smaller_file(lib, tmp_path):
    from lib_sdtoolkit.ui import prune_tab

    root = tmp_path / "p"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    vals = dict(choice="[checkpoint] sd15-tiny-finetune.safetensors", path="", only=[], dtype="fp16",
                keep_ema=False, keep_junk=False, fix_position_ids=False, bare=False, output="", overwrite=False)
    msg, res = prune_tab.run_prune(host, vals)
    assert res and res["written"], msg
    assert res["out_file_size"] < res["in_file_size"] / 2


# ------------------------------------------------------------------------------------------------ Stop
class _FakeGrProgress:
    """What gr.Progress is to a handler: a callable taking (fraction, desc=...); records the descriptions and
    presses the tab's Stop button (common.stop_jobs, what its click does) at the first call in ``phase``."""

    def __init__(self, stop_key: str, phase: str):
        self.stop_key, self.phase, self.descs, self.stopped = stop_key, phase, [], 0

    def __call__(self, frac, desc=""):
        from lib_sdtoolkit.ui.common import stop_jobs

        self.descs.append(desc)
        if desc.startswith(self.phase) and not self.stopped:
            self.stopped = stop_jobs(self.stop_key)


@pytest.mark.parametrize("phase", ["hashing inputs", "merging"])
def test_stop_during_a_merge_leaves_no_file(lib, tmp_path, phase):
    from lib_sdtoolkit.ui import merge_tab

    root = tmp_path / "s"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    before = _files(root)
    gp = _FakeGrProgress("merge", phase)
    html_, text, rep = merge_tab.run_merge(host, dict(
        model_a="sd15-tiny-finetune.safetensors", model_b="sd15-tiny.safetensors", model_c="", method="weighted_sum",
        alpha=0.5, beta=None, blocks="", base_alpha="", dtype="fp16", keep_ema=False, fix_position_ids=False,
        bake_vae="None", discard="", seed=0, device="cpu", allow_extrapolation=False, output="stopped",
        overwrite=False), progress=gp)
    assert gp.stopped == 1, gp.descs
    assert rep is None and "stopped" in text, text
    assert _files(root) == before                     # no output, no .tmp


def test_stop_during_prune_leaves_no_file(lib, tmp_path):
    from lib_sdtoolkit.ui import prune_tab

    root = tmp_path / "sp"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    before = _files(root)
    gp = _FakeGrProgress("prune", "pruning")
    msg, res = prune_tab.run_prune(host, dict(
        choice="[checkpoint] sd15-tiny-finetune.safetensors", path="", only=[], dtype="fp16", keep_ema=False,
        keep_junk=False, fix_position_ids=False, bare=False, output="", overwrite=False), progress=gp)
    assert gp.stopped == 1 and res is None and "stopped" in msg, (gp.descs, msg)
    assert _files(root) == before


def test_progress_says_phase_count_and_eta():
    from lib_sdtoolkit.ui.common import eta_text, gradio_progress

    seen = []
    now = [100.0]
    p = gradio_progress(lambda frac, desc="": seen.append((frac, desc)), clock=lambda: now[0])
    p("hashing inputs", 0, 4)
    now[0] += 3.0
    p("hashing inputs", 1, 4)
    p("merging", 0, 10)
    assert seen[0] == (0.0, "hashing inputs: 0/4")
    assert seen[1] == (0.25, "hashing inputs: 1/4 · ETA 9 s")  # 3 s for a quarter: 9 s for the rest
    assert seen[2] == (0.0, "merging: 0/10")                   # a new phase has its own clock
    assert eta_text(125) == "ETA 2 min 5 s" and eta_text(7300) == "ETA 2 h 1 min"


# ------------------------------------------------------------------------------------------------ merge form
def test_merge_form_sends_only_what_the_method_uses_and_names_an_unedited_preset(lib, host):
    from lib_sdtoolkit.ui import merge_tab

    vals = dict(model_a="sd15-tiny.safetensors", model_b="sd15-tiny-finetune.safetensors",
                model_c="sdxl-tiny.safetensors", method="weighted_sum", alpha=0.5, beta=0.3, blocks="",
                base_alpha="", dtype="fp16", keep_ema=False, fix_position_ids=False, bake_vae="None", discard="",
                seed=0, device="default", allow_extrapolation=False, output="", overwrite=False)
    req = merge_tab.merge_request(vals)
    assert req.model_c is None and req.beta is None           # weighted_sum uses neither
    req = merge_tab.merge_request(dict(vals, method="sum_twice"))
    assert req.model_c == "sdxl-tiny.safetensors" and req.beta == 0.3
    text = merge_tab.preset_text("GRAD_V", "SD1")
    assert text.split(",")[:3] == ["0", "1", "0.917"]             # 3 decimals, BASE first
    req = merge_tab.merge_request(dict(vals, blocks=text, preset="GRAD_V", family="SD1"))
    assert req.preset == "GRAD_V" and req.blocks is None          # unedited: by name, exact values
    req = merge_tab.merge_request(dict(vals, blocks=text.replace("0.917", "0.9", 1), preset="GRAD_V",
                                       family="SD1"))
    assert req.preset is None and req.blocks.startswith("0,1,0.9,")
    for m in merge_tab.METHODS:                                    # one formula line per registered method
        assert "`" in merge_tab.method_help(m)[4]


def test_block_editor_names_blocks_keeps_base_apart_and_warns(lib, host):
    from lib_sdtoolkit.arch.blocks import block_names
    from lib_sdtoolkit.ui import merge_tab

    sd1 = merge_tab.preset_text("GRAD_V", "SD1")
    rows, svg, msg = merge_tab.editor_state(host, "sd15-tiny.safetensors", "GRAD_V", sd1, 0.5, "")
    assert [r[0] for r in rows] == block_names("SD1")
    assert all(len(r[1].split(".")[-1]) <= 3 for r in rows)
    for name in block_names("SD1")[1:]:
        assert f">{name}</text>" in svg
    assert svg.count("<polyline") == 1 and "BASE" in svg
    # BASE is not on the UNet line: the line has exactly the UNet blocks' points
    line = svg.split('<polyline points="')[1].split('"')[0]
    assert len(line.split()) == len(block_names("SD1")) - 1
    assert "warn" not in msg
    sdxl = merge_tab.preset_text("GRAD_V", "SDXL")
    rows, svg, msg = merge_tab.editor_state(host, "sdxl-tiny.safetensors", "GRAD_V", sdxl, 0.5, "")
    assert len(rows) == len(block_names("SDXL")) and "IN09..IN11" in msg and "Cut" in msg
    rows, svg, msg = merge_tab.editor_state(host, "sd15-tiny.safetensors", "", ",".join(["1.25"] + ["0.5"] * 25),
                                            0.5, "")
    assert "BASE = 1.25 is outside [0, 1]" in msg and "sdtoolkit-chart-bad" in svg
    assert merge_tab.table_text(rows) == ",".join(["1.25"] + ["0.5"] * 25)


def test_preset_merge_names_the_output_after_the_preset(lib, tmp_path):
    from safetensors import safe_open

    from lib_sdtoolkit.ui import merge_tab

    root = tmp_path / "pm"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    text = merge_tab.preset_text("GRAD_V", "SD1")
    html_, report, rep = merge_tab.run_merge(host, dict(
        model_a="sd15-tiny-finetune.safetensors", model_b="sd15-tiny.safetensors", model_c="", method="weighted_sum",
        alpha=0.5, beta=None, blocks=text, base_alpha="", dtype="fp16", keep_ema=False, fix_position_ids=False,
        bake_vae="None", discard="", seed=0, device="cpu", allow_extrapolation=False, output="", overwrite=False,
        preset="GRAD_V", family="SD1"))
    assert rep is not None, report
    assert "GRAD_V" in rep["name"]
    with safe_open(rep["output"], "pt") as f:
        meta = f.metadata()
    assert "GRAD_V" in str(meta)
    assert "GRAD_V" in report                                     # the report names it too


# ------------------------------------------------------------------------------------------------ pickers
def test_every_picker_is_refreshed_after_a_writing_event_and_on_load(lib, tmp_path):
    """The built app: each writing button has a follow-up event whose outputs are every registered picker, and a
    page-load event with the same outputs; the refresh lists a file written after the UI was built."""
    from lib_sdtoolkit.ui import build_app
    from lib_sdtoolkit.ui import common

    root = tmp_path / "pk"
    shutil.copytree(lib[0], root)
    host = StandaloneHost(models_dir=root)
    captured = []
    real_wire = common.PickerSet.wire

    def spy(self, h, blocks=None):
        captured.append(self)
        return real_wire(self, h, blocks)

    common.PickerSet.wire = spy
    try:
        demo = build_app(host)
    finally:
        common.PickerSet.wire = real_wire
    pickers = captured[0]
    ids = {getattr(c, "elem_id", None) for c in pickers.components()}
    assert {"sdtoolkit_merge_a", "sdtoolkit_merge_b", "sdtoolkit_inspect_model", "sdtoolkit_prune_model",
            "sdtoolkit_hashes_files", "sdtoolkit_tiled_vae_model", "sdtoolkit_lora_inspect_file"} <= ids
    assert len(pickers.writers) >= 3                           # sample, merge, prune, dedup confirm
    out_ids = {c._id for c in pickers.components()}
    deps = demo.config["dependencies"]
    refreshing = [d for d in deps if set(d["outputs"]) == out_ids]
    assert len(refreshing) == len(pickers.writers) + 1         # one per writer, one on load
    shutil.copy(root / library.NAMES["sd15"], root / "Stable-diffusion" / "written-later.safetensors")
    current = [None] * len(pickers.components())
    ups = pickers.refresh(host, *current)
    assert len(ups) == len(current)
    assert [u.get("value") for u in ups[len(pickers.pickers):]] == [str(root / library.NAMES["latent"]),
                                                                     str(root / library.NAMES["image"]),
                                                                     str(root / library.NAMES["image"])]
    a = next(u for p, u in zip(pickers.pickers, ups) if p.component.elem_id == "sdtoolkit_merge_a")
    b = next(u for p, u in zip(pickers.pickers, ups) if p.component.elem_id == "sdtoolkit_merge_b")
    assert "written-later.safetensors" in a["choices"]
    assert a["value"] != b["value"]                            # Model B defaults to the second entry


# ------------------------------------------------------------------------------------------------ dedup keep
def test_dedup_keeps_the_copy_the_user_chose_on_every_face(lib, tmp_path, capsys):
    import json

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.cli import main
    from lib_sdtoolkit.server import make_router
    from lib_sdtoolkit.ui import hashes_tab

    root, paths = lib
    host = StandaloneHost(models_dir=root)
    rep = run("dedup", host, {"kind": "vae"}).to_dict()
    assert [g["keeper"] for g in rep["groups"]] == [str(paths["vae"])]      # default: the shortest name
    rep = run("dedup", host, {"kind": "vae", "keep": ["vae-tiny-copy.safetensors"]}).to_dict()
    assert [g["keeper"] for g in rep["groups"]] == [str(paths["vae-copy"])]
    with pytest.raises(InvalidInputError, match="same weights"):
        run("dedup", host, {"kind": "vae", "keep": ["vae-tiny.safetensors", "vae-tiny-copy.safetensors"]})
    client = TestClient(_app(host))
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "keep": ["vae-tiny-copy"]})
    assert r.status_code == 200, r.text
    assert [g["keeper"] for g in r.json()["groups"]] == [str(paths["vae-copy"])]
    assert client.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "keep": ["../x"]}).status_code == 403
    capsys.readouterr()
    assert main(["dedup", str(root / "VAE"), "--kind", "vae", "--keep", str(paths["vae-copy"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["keeper"] for g in out["groups"]] == [str(paths["vae-copy"])]
    msg, rows, res = hashes_tab.run_dedup(host, "vae", "", keep=[str(paths["vae-copy"])])
    assert res["groups"][0]["keeper"] == str(paths["vae-copy"])
    groups = [[str(paths["vae"]), str(paths["vae-copy"])]]
    assert hashes_tab.one_per_group([str(paths["vae"]), str(paths["vae-copy"])], [str(paths["vae"])],
                                    groups) == [str(paths["vae-copy"])]


def _app(host):
    from fastapi import FastAPI

    from lib_sdtoolkit.server import make_router

    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    return app


# ------------------------------------------------------------------------------------------------ serve
def test_serve_on_a_busy_port_says_so_and_offers_a_free_one(tmp_path, capsys):
    from lib_sdtoolkit.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--models-dir", str(tmp_path / "m"), "--port", str(port), "--no-ui"]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "try --port " in err
    assert "Traceback" not in err
