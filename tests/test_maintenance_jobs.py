"""The maintenance jobs (inspect, prune, hash, dedup) through their three faces: the CLI, the HTTP API and the tab
handlers give the same result; every route refuses unknown fields and names outside the model folders; prune writes
nothing when nothing would change; the model picker says when its path box was used instead of the dropdown."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_sdtoolkit.cli import main
from lib_sdtoolkit.host import StandaloneHost
from lib_sdtoolkit.server import make_router

PRUNE_SRC = "sd1_ema_junk_ckpt"  # EMA, DDPM buffers, loss.*, broken float position_ids: pruning changes a lot
HASH_KEYS = ("sha256", "autov2", "autov1", "autov3", "blake3", "crc32", "civitai", "size")


@pytest.fixture()
def lib(tmp_path, fixture_files, monkeypatch):
    """A models folder (checkpoint to prune, an already-lean fp16 checkpoint, two byte-identical VAEs), its host,
    an API client on it, and a file outside every model folder."""
    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    shutil.copy(fixture_files[PRUNE_SRC], root / "Stable-diffusion" / "big.ckpt")
    shutil.copy(fixture_files["sd1_fp16"], root / "Stable-diffusion" / "lean.safetensors")
    shutil.copy(fixture_files["vae"], root / "VAE" / "a.safetensors")
    (root / "VAE" / "sub").mkdir()
    shutil.copy(fixture_files["vae"], root / "VAE" / "sub" / "b.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(fixture_files["vae"], outside / "o.safetensors")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    return host, root, TestClient(app), outside


def _cli_json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


# ------------------------------------------------------------------------------------------------ parity
def test_inspect_parity_cli_api_tab(lib, capsys):
    from lib_sdtoolkit.ui.inspect_tab import run_inspect

    host, root, client, _ = lib
    f = root / "Stable-diffusion" / "big.ckpt"
    cli = _cli_json(capsys, ["inspect", str(f)])
    r = client.get("/sdtoolkit/v1/inspect", params={"path": "big.ckpt", "kind": "checkpoint"})
    assert r.status_code == 200, r.text
    tab = run_inspect(host, "[checkpoint] big.ckpt", "")[3]
    assert cli == r.json() == tab
    assert cli["architecture"] == "SD1" and cli["ema"]["keys"] > 0 and cli["name"] == "big.ckpt"


def test_prune_parity_cli_api_tab_byte_identical(lib, tmp_path, capsys):
    from lib_sdtoolkit.ui.prune_tab import run_prune

    host, root, client, _ = lib
    src = root / "Stable-diffusion" / "big.ckpt"
    cli_out = tmp_path / "cli.safetensors"
    cli = _cli_json(capsys, ["prune", str(src), "-o", str(cli_out), "--dtype", "bf16", "--fix-position-ids"])
    r = client.post("/sdtoolkit/v1/prune", json={"path": "big.ckpt", "output": "api.safetensors", "dtype": "bf16",
                                                 "fix_position_ids": True})
    assert r.status_code == 200, r.text
    msg, tab = run_prune(host, {"choice": "[checkpoint] big.ckpt", "path": "", "only": [], "dtype": "bf16",
                                "keep_ema": False, "keep_junk": False, "fix_position_ids": True, "bare": False,
                                "output": "tab.safetensors", "overwrite": False})
    assert tab is not None, msg
    ck = root / "Stable-diffusion"
    data = cli_out.read_bytes()
    assert data == (ck / "api.safetensors").read_bytes() == (ck / "tab.safetensors").read_bytes()
    same = lambda d: {k: v for k, v in d.items() if k not in ("input", "output", "name", "kind")}  # noqa: E731
    assert same(cli) == same(r.json()) == same(tab)
    assert cli["written"] and cli["dropped"] and cli["position_ids"]["fixed"]
    assert (r.json()["name"], tab["name"], r.json()["kind"]) == ("api.safetensors", "tab.safetensors", "checkpoint")


def test_hash_parity_cli_api_tab(lib, capsys, fixture_files):
    import hashlib

    from lib_sdtoolkit.ui.hashes_tab import run_hashes

    host, root, client, _ = lib
    f = root / "VAE" / "a.safetensors"
    cli = _cli_json(capsys, ["hash", str(f), "--no-cache"])
    r = client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"], "kind": "vae"})
    assert r.status_code == 200, r.text
    api = r.json()
    assert set(api) == {"results", "problems", "webui_cache_entries"}
    msg, rows, tab = run_hashes(host, ["[vae] a.safetensors"])
    assert tab is not None, msg
    pick = lambda d: {k: d.get(k) for k in HASH_KEYS}  # noqa: E731
    assert pick(cli) == pick(api["results"][0]) == pick(tab["results"][0])
    assert cli["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert api["results"][0]["kind"] == "vae" and tab["results"][0]["name"] == "a.safetensors"


def test_dedup_parity_cli_api_tab(lib, capsys):
    from lib_sdtoolkit.ui.hashes_tab import run_dedup

    host, root, client, _ = lib
    cli = _cli_json(capsys, ["dedup", str(root / "VAE"), "--kind", "vae", "--no-cache"])
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae"})
    assert r.status_code == 200, r.text
    msg, rows, tab = run_dedup(host, "vae", "")
    assert tab is not None, msg
    api = r.json()
    for d in (cli, api, tab):  # the cache answers the later runs: only whether it did differs
        d.pop("files_read")
        for g in d["groups"]:
            for f in g["files"]:
                f.pop("cached")
    assert cli == api == tab
    assert len(cli["groups"]) == 1 and cli["groups"][0]["match"] == "bytes"
    assert cli["folders"] == [str(root / "VAE")] and cli["table"]["rows"][0][2] == "keep"


def test_job_constants_match_the_features():
    from lib_sdtoolkit import dedup, prune
    from lib_sdtoolkit.jobs import maintenance

    assert maintenance.DEDUP_KINDS == dedup.KINDS and maintenance.DEDUP_ACTIONS == dedup.ACTIONS
    assert set(maintenance.PRUNE_DTYPES) == set(prune.DTYPES)


# ------------------------------------------------------------------------------------------------ the gate
GATE_CASES = [
    # (route, body, status): unknown fields, then every field that names a file or folder
    ("prune", {"path": "big.ckpt", "outptu": "x.safetensors"}, 422),
    ("prune", {"path": "../big.ckpt"}, 403),
    ("prune", {"path": "{outside}/o.safetensors"}, 403),
    ("prune", {"path": "missing.ckpt"}, 404),
    ("prune", {"path": "big.ckpt", "output": "../escape.safetensors"}, 403),
    ("prune", {"path": "big.ckpt", "output": "{outside}/escape.safetensors"}, 403),
    ("hash", {"paths": ["a.safetensors"], "algo": ["sha256"]}, 422),
    ("hash", {"paths": ["../outside/o.safetensors"]}, 403),
    ("hash", {"paths": ["{outside}/o.safetensors"]}, 403),
    ("hash", {"paths": ["missing.safetensors"]}, 404),
    ("hash", {"paths": ["a.safetensors"], "cache": "/tmp/c.sqlite"}, 422),       # CLI-only fields stay off the API
    ("hash", {"paths": ["a.safetensors"], "webui_dir": "{outside}"}, 422),
    ("dedup", {"kind": "vae", "confirmed": True}, 422),
    ("dedup", {"kind": "vae", "folders": ["../"]}, 403),
    ("dedup", {"kind": "vae", "folders": ["{outside}"]}, 403),
    ("dedup", {"kind": "vae", "folders": ["no-such-folder"]}, 422),
    ("dedup", {"kind": "vae", "action": "move", "to": "../x", "confirm": True}, 403),
    ("dedup", {"kind": "vae", "action": "move", "to": "{outside}", "confirm": True}, 403),
    ("dedup", {"kind": "vae", "action": "hardlink"}, 422),                          # no confirm
]


@pytest.mark.parametrize("route,body,status", GATE_CASES)
def test_routes_refuse_unknown_fields_and_names_outside(lib, route, body, status):
    host, root, client, outside = lib
    body = json.loads(json.dumps(body).replace("{outside}", str(outside)))
    before = sorted(p for p in root.parent.rglob("*") if "cache" not in p.parts)
    r = client.post(f"/sdtoolkit/v1/{route}", json=body)
    assert r.status_code == status, (body, r.text)
    assert r.json()["detail"]  # a message (or FastAPI's list of validation errors) naming the problem
    unknown = [k for k in body if k in ("outptu", "algo", "confirmed", "cache", "webui_dir")]
    assert all(k in r.text for k in unknown)
    after = sorted(p for p in root.parent.rglob("*") if "cache" not in p.parts)
    assert after == before  # nothing written, moved or created


@pytest.mark.parametrize("params,status", [
    ({"path": "a.safetensors", "knd": "vae"}, 422),
    ({"path": "../outside/o.safetensors"}, 403),
    ({"path": "{outside}/o.safetensors"}, 403),
    ({"path": "missing.safetensors"}, 404),
])
def test_inspect_route_gate(lib, params, status):
    host, root, client, outside = lib
    params = {k: v.replace("{outside}", str(outside)) for k, v in params.items()}
    r = client.get("/sdtoolkit/v1/inspect", params=params)
    assert r.status_code == status, r.text


# ------------------------------------------------------------------------------------------------ issue 15
def test_prune_writes_nothing_when_nothing_would_change(lib, tmp_path, capsys):
    """An fp16 checkpoint without EMA or junk pruned to fp16: no file (it used to write a copy "saving -184 B")."""
    from lib_sdtoolkit.ui.prune_tab import run_prune

    host, root, client, _ = lib
    src = root / "Stable-diffusion" / "lean.safetensors"
    out = tmp_path / "lean-pruned.safetensors"
    assert main(["prune", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nothing would change" in text and "saved" not in text and not out.exists()
    listing = sorted(os.listdir(root / "Stable-diffusion"))
    r = client.post("/sdtoolkit/v1/prune", json={"path": "lean.safetensors", "output": "x.safetensors"})
    assert r.status_code == 200, r.text
    assert r.json()["written"] is False and r.json()["output"] is None and "nothing would change" in r.json()["note"]
    msg, res = run_prune(host, {"choice": "[checkpoint] lean.safetensors", "path": "", "only": [], "dtype": "fp16",
                                "keep_ema": False, "keep_junk": False, "fix_position_ids": False, "bare": False,
                                "output": "", "overwrite": False})
    assert res["written"] is False and "nothing would change" in msg and "Wrote" not in msg
    assert sorted(os.listdir(root / "Stable-diffusion")) == listing
    # the same file to bf16 is a change: written
    r = client.post("/sdtoolkit/v1/prune", json={"path": "lean.safetensors", "dtype": "bf16"})
    assert r.status_code == 200 and r.json()["written"] is True
    assert r.json()["name"] == "lean-pruned-bf16.safetensors"  # a blank name comes from this run's options


def test_prune_default_names_follow_the_options(lib, capsys):
    host, root, client, _ = lib
    r = client.post("/sdtoolkit/v1/prune", json={"path": "big.ckpt", "only": ["vae"]})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["kind"]) == ("big.vae.safetensors", "vae")
    assert (root / "VAE" / "big.vae.safetensors").is_file()
    src = root / "Stable-diffusion" / "big.ckpt"
    assert main(["prune", str(src), "--only", "unet", "--dtype", "fp32"]) == 0  # no -o: beside the input
    assert (root / "Stable-diffusion" / "big-unet-pruned-fp32.safetensors").is_file()


def test_picker_says_when_the_path_box_wins(lib):
    from lib_sdtoolkit.ui.inspect_tab import run_inspect

    host, root, client, _ = lib
    arch, rows, text, rep = run_inspect(host, "[checkpoint] big.ckpt", "a.safetensors")
    assert rep["architecture"] == "VAE" and "path box" in arch and "big.ckpt" in arch
    arch, rows, text, rep = run_inspect(host, "[checkpoint] big.ckpt", "")
    assert rep["architecture"] == "SD1" and "path box" not in arch
    arch, rows, text, rep = run_inspect(host, None, "a.safetensors")
    assert rep["architecture"] == "VAE" and "path box" not in arch  # only one input given: nothing to say


def test_cli_hash_and_dedup_exit_2_when_a_file_cannot_be_read(lib, tmp_path, capsys):
    host, root, client, _ = lib
    d = tmp_path / "scan"
    d.mkdir()
    shutil.copy(root / "VAE" / "a.safetensors", d / "a.safetensors")
    (d / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    os.mkfifo(d / "fifo.safetensors")  # not a regular file: never opened, listed as a problem
    assert main(["hash", str(d), "--no-cache"]) == 2  # any regular file has hashes, whatever its bytes
    out, err = capsys.readouterr()
    assert "a.safetensors" in out and "broken.safetensors" in out
    assert [ln for ln in err.splitlines() if "fifo.safetensors" in ln and ln.startswith("error:")]
    assert main(["dedup", str(d), "--no-cache"]) == 2
    out, err = capsys.readouterr()
    assert "broken.safetensors" in err
    assert main(["hash", str(d / "a.safetensors"), "--no-cache"]) == 0
    capsys.readouterr()
    assert main(["hash", str(d / "a.safetensors"), "--cache", str(tmp_path / "c"), "--no-cache"]) == 2


def test_prune_of_a_lean_bare_vae_changes_nothing(fixture_files, tmp_path):
    """A bare fp16 VAE extracted again (``only vae``: bare keys by default) is the same tensors: no file; its fp32
    original is converted, and the prefixed pickle loses its prefix: both written."""
    import torch

    from lib_sdtoolkit.files import open_model, save_safetensors
    from lib_sdtoolkit.prune import PruneOptions, prune_file

    with open_model(fixture_files["vae"]) as r:
        sd = {k: r.get(k).half() if r.get(k).is_floating_point() else r.get(k) for k in r.keys()}
    lean = tmp_path / "lean.vae.safetensors"
    save_safetensors(lean, sd)
    res = prune_file(lean, tmp_path / "again.safetensors", PruneOptions(only=["vae"]))
    assert not res.written and res.output is None and not (tmp_path / "again.safetensors").exists()
    assert res.kept == {"vae": len(sd)} and "nothing would change" in res.note
    res = prune_file(fixture_files["vae"], tmp_path / "half.safetensors", PruneOptions(only=["vae"]))
    assert res.written and res.converted == len([t for t in sd.values() if t.dtype == torch.float16])
    res = prune_file(fixture_files["vae_prefixed_pt"], tmp_path / "bare.safetensors",
                     PruneOptions(only=["vae"], dtype="keep"))
    assert res.written and res.prefix_stripped == "first_stage_model."
    # same tensors, other container: a conversion the user asked for, so written
    res = prune_file(lean, tmp_path / "lean.ckpt", PruneOptions(only=["vae"]))
    assert res.written and (tmp_path / "lean.ckpt").is_file()


def test_stop_leaves_nothing_behind(lib, tmp_path):
    """Stop (Progress.cancel) during a prune or a hash: the job ends with Cancelled, no output or temp file, and no
    cache entry."""
    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.errors import Cancelled
    from lib_sdtoolkit.files.hash_cache import HashCache
    from lib_sdtoolkit.progress import Progress

    host, root, client, _ = lib
    seen = []

    def stop_after_two(phase, done, total, detail):
        seen.append(phase)
        if len(seen) == 2:
            progress.cancel()

    progress = Progress(stop_after_two)
    before = sorted(os.listdir(root / "Stable-diffusion"))
    with pytest.raises(Cancelled):
        jobs.run("prune", host, {"path": "big.ckpt", "output": "stopped.safetensors"}, progress)
    assert sorted(os.listdir(root / "Stable-diffusion")) == before and seen[0] == "pruning"
    host.settings["sdtoolkit_hash_cache"] = str(tmp_path / "stop-cache.sqlite")
    progress = Progress(lambda *a: progress.cancel())  # Stop at the first report of the hashing
    with pytest.raises(Cancelled):  # one file: the Stop is not listed as a "problem" of that file
        jobs.run("hash", host, {"paths": ["big.ckpt"]}, progress)
    with HashCache(tmp_path / "stop-cache.sqlite") as c:
        assert len(c) == 0


def test_prune_tab_inspect_button_shows_what_pruning_keeps(lib):
    """The Prune tab's Inspect button (its handler ``preview``) in the real A1111 1.10.1 raised
    ``TypeError: 'NoneType' object is not callable``: it passed None as the inspect job's progress."""
    from lib_sdtoolkit.ui.prune_tab import preview

    host, root, _, _ = lib
    summary, rows = preview(host, "[checkpoint] big.ckpt", "", [], False, False, "fp16")
    assert "sdtoolkit-ok" in summary and "big.ckpt" in summary
    kept = {r[0]: r[3] for r in rows}
    assert {"unet", "vae", "text_encoder", "ema", "junk"} <= set(kept) and kept["ema"] == "no" and kept["unet"] == "yes"


def test_prune_takes_a_bare_output_name_like_merge(lib):
    """A name without a suffix gets ``.safetensors`` (the Merge and LoRA tools do the same; the real A1111's Prune tab
    refused "sdt-ui-pruned-11" with "the output must end in .safetensors, ...")."""
    from lib_sdtoolkit.ui.prune_tab import run_prune

    host, root, _, _ = lib
    msg, res = run_prune(host, {"choice": "[checkpoint] big.ckpt", "path": "", "only": [], "dtype": "fp16",
                                "keep_ema": False, "keep_junk": False, "fix_position_ids": False, "bare": False,
                                "output": "bare-name", "overwrite": False})
    assert res is not None and res.get("written"), msg
    assert (root / "Stable-diffusion" / "bare-name.safetensors").is_file()
