"""Content hash and dedup: the same weights are found across .pt/.ckpt/.safetensors, fp32/fp16 and prefixed/bare
variants, different weights stay apart; the documented canonical form recomputed here with plain torch; a warm
scan reads no file; actions only on request, hard links only for byte duplicates, nothing deleted."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lib_sdtoolkit.cli import main
from lib_sdtoolkit.dedup import ScannedFile, _hardlink, content_hash, dedup, scan
from lib_sdtoolkit.files.hash_cache import HashCache
from lib_sdtoolkit.samples import factory


@pytest.fixture(scope="session")
def vae_variants(tmp_path_factory, fixture_files):
    """The same VAE weights in several files, plus different weights."""
    d = tmp_path_factory.mktemp("vae_variants")
    out = {
        "st32": fixture_files["vae"],                       # bare keys, fp32 safetensors
        "pt_prefixed": fixture_files["vae_prefixed_pt"],    # first_stage_model.* in a .pt pickle
    }
    out["st16"] = factory.write_checkpoint(d / "vae16.safetensors", "VAE", dtype=torch.float16)
    out["ckpt_junk"] = factory.write_checkpoint(d / "vae_junk.ckpt", "VAE", junk=True)  # loss.* etc.
    out["st_meta"] = factory.write_checkpoint(d / "vae_meta.safetensors", "VAE", metadata={"format": "pt"})
    out["bf16"] = factory.write_checkpoint(d / "vae_bf16.safetensors", "VAE", dtype=torch.bfloat16)
    out["other"] = factory.write_checkpoint(d / "vae_other.safetensors", "VAE", seed=1)
    return out


def test_same_weights_same_content_hash(vae_variants):
    hs = {k: content_hash(p) for k, p in vae_variants.items()}
    same = {hs[k].hash for k in ("st32", "pt_prefixed", "st16", "ckpt_junk", "st_meta")}
    assert len(same) == 1 and None not in same
    assert hs["bf16"].hash not in same  # bf16 keeps fewer mantissa bits than fp16: documented non-match
    assert hs["other"].hash not in same
    assert hs["ckpt_junk"].dropped_keys > 0 and hs["st32"].dropped_keys == 0
    # the files really differ byte-wise
    shas = {hashlib.sha256(Path(vae_variants[k]).read_bytes()).hexdigest() for k in same and vae_variants}
    assert len(shas) == len(vae_variants)


def test_content_hash_follows_the_documented_formula(fixture_files):
    """Recompute sdt-content-v3 with plain torch + hashlib from the module docstring."""
    from safetensors.torch import load_file

    sd = load_file(str(fixture_files["vae"]))
    lines = []
    for k, t in sd.items():
        c = t.to(torch.float16) if t.is_floating_point() else t
        digest = hashlib.sha256(c.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        lines.append(f"vae/{k}\t{str(c.dtype).replace('torch.', '')}\t{list(c.shape)}\t{digest}")
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode() + b"\n")
    ch = content_hash(fixture_files["vae"])
    assert ch.hash == h.hexdigest() == ch.components["vae"]


def test_checkpoint_variants_and_baked_vae(fixture_files, tmp_path):
    sd1, sd1_16 = (content_hash(fixture_files[k]) for k in ("sd1", "sd1_fp16"))
    assert sd1.hash == sd1_16.hash
    # the old .ckpt with EMA and junk: UNet and VAE are the same weights, the text encoder is not (its
    # position_ids read 75 where 76 belongs), so the whole file is not a duplicate of the clean one
    old = content_hash(fixture_files["sd1_ema_junk_ckpt"])
    assert old.components["unet"] == sd1.components["unet"] and old.components["vae"] == sd1.components["vae"]
    assert old.components["text_encoder"] != sd1.components["text_encoder"] and old.hash != sd1.hash
    # pruned with the position_ids fixed, as a .ckpt: the same weights again
    from lib_sdtoolkit.prune import PruneOptions, prune_file
    fixed = tmp_path / "fixed.ckpt"
    prune_file(fixture_files["sd1_ema_junk_ckpt"], fixed, PruneOptions(fix_position_ids=True))
    assert content_hash(fixed).hash == sd1.hash
    # the VAE baked into the checkpoint is recognisable as a standalone VAE (same seed: same weights)
    assert sd1.components["vae"] == content_hash(fixture_files["vae"]).hash


@pytest.fixture()
def folder(tmp_path, vae_variants):
    d = tmp_path / "VAE"
    (d / "sub").mkdir(parents=True)
    shutil.copy(vae_variants["st32"], d / "animevae.safetensors")
    shutil.copy(vae_variants["st32"], d / "sub" / "orangemix.vae.safetensors")  # byte-identical copy
    shutil.copy(vae_variants["pt_prefixed"], d / "Anything-V3.0.vae.pt")         # same weights, pickle
    shutil.copy(vae_variants["st16"], d / "anime-fp16.safetensors")              # same weights, fp16
    shutil.copy(vae_variants["other"], d / "different.safetensors")
    shutil.copy(vae_variants["bf16"], d / "bf16.safetensors")
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return d


def test_scan_groups_and_keeper(folder, tmp_path):
    with HashCache(tmp_path / "c.sqlite") as cache:
        res = dedup([folder], "vae", cache=cache)
    assert len(res.groups) == 1
    g = res.groups[0]
    names = [Path(f.path).name for f in g.files]
    assert sorted(names) == sorted(["animevae.safetensors", "orangemix.vae.safetensors", "Anything-V3.0.vae.pt",
                                    "anime-fp16.safetensors"])
    assert names[0] == "animevae.safetensors"  # .safetensors first, then the shortest name
    assert g.match == "near"  # the fp16 copy holds the same weights only after fp16 rounding
    assert sorted(Path(p).name for p in g.exact_sets[0]) == ["Anything-V3.0.vae.pt", "animevae.safetensors",
                                                             "orangemix.vae.safetensors"]
    assert [Path(p).name for p in g.exact_sets[1]] == ["anime-fp16.safetensors"]
    assert sorted(Path(p).name for p in g.byte_sets[0]) == ["animevae.safetensors", "orangemix.vae.safetensors"]
    assert g.gain_bytes == sum(f.size for f in g.files[1:])
    assert [Path(p.path).name for p in res.scan.problems] == ["broken.safetensors"]
    assert res.actions == []


def test_warm_scan_reads_no_file_data(folder, tmp_path, monkeypatch):
    cache_path = tmp_path / "c.sqlite"
    with HashCache(cache_path) as cache:
        cold = scan([folder], "vae", cache)
    assert cold.read_files == len(cold.files) + len(cold.problems)
    watched = {os.path.realpath(p) for p in folder.rglob("*") if p.is_file()}
    opened = []
    real = (builtins.open, io.open, os.open)

    def spy(fn):
        def wrapper(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(os.fspath(file)) in watched:
                opened.append(os.fspath(file))
            return fn(file, *a, **k)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real[0]))
    monkeypatch.setattr(io, "open", spy(real[1]))
    monkeypatch.setattr(os, "open", spy(real[2]))
    with HashCache(cache_path) as cache:
        warm = scan([folder], "vae", cache)
    assert warm.read_files == 1 and [Path(p.path).name for p in warm.problems] == ["broken.safetensors"]
    assert opened and all(Path(p).name == "broken.safetensors" for p in opened)  # only the unreadable one
    assert [f.content for f in warm.files] == [f.content for f in cold.files]
    assert all(f.cached for f in warm.files)


def test_hardlink_only_byte_duplicates_and_nothing_deleted(folder, tmp_path):
    before = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    names_before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    with HashCache(tmp_path / "c.sqlite") as cache:
        res = dedup([folder], "vae", action="hardlink", cache=cache)
    linked = [a for a in res.actions if a.action == "hardlinked"]
    assert [Path(a.path).name for a in linked] == ["orangemix.vae.safetensors"]
    assert os.path.samefile(folder / "animevae.safetensors", folder / "sub" / "orangemix.vae.safetensors")
    assert not os.path.samefile(folder / "animevae.safetensors", folder / "Anything-V3.0.vae.pt")
    assert {Path(a.path).name for a in res.actions if a.action == "skipped"} >= {"Anything-V3.0.vae.pt"}
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == names_before
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()} == before
    # a second run: already linked, nothing to gain from that pair
    with HashCache(tmp_path / "c.sqlite") as cache:
        again = dedup([folder], "vae", action="hardlink", cache=cache)
    assert not [a for a in again.actions if a.action == "hardlinked"]


def test_hardlink_refused_across_filesystems(folder):
    a, b = folder / "animevae.safetensors", folder / "sub" / "orangemix.vae.safetensors"
    sa, sb = os.stat(a), os.stat(b)
    keeper = ScannedFile(str(a), sa.st_size, sa.st_mtime_ns, sa.st_ino, sa.st_dev, 1)
    dup = ScannedFile(str(b), sb.st_size, sb.st_mtime_ns, sb.st_ino, sb.st_dev + 1, 1)  # as if on another disk
    r = _hardlink(keeper, dup)
    assert r.action == "skipped" and "another filesystem" in r.reason
    assert not os.path.samefile(a, b)


def test_move_needs_to_and_moves_without_deleting(folder, tmp_path, capsys):
    cache = str(tmp_path / "c.sqlite")
    assert main(["dedup", str(folder), "--action", "move", "--cache", cache]) == 2
    assert "--to" in capsys.readouterr().err
    assert main(["dedup", str(folder), "--to", str(tmp_path), "--cache", cache]) == 2
    assert main(["dedup", str(tmp_path / "nope"), "--cache", cache]) == 2
    with pytest.raises(SystemExit) as e:
        main(["dedup", str(folder), "--kind", "unet"])
    assert e.value.code == 2
    dest = tmp_path / "dups"
    dest.mkdir()
    before = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file())
    rc = main(["dedup", str(folder), "--kind", "vae", "--action", "move", "--to", str(dest), "--json",
               "--cache", cache])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2  # broken.safetensors is reported
    moved = sorted(Path(a["target"]).name for a in out["actions"] if a["action"] == "moved")
    assert moved == sorted(["orangemix.vae.safetensors", "Anything-V3.0.vae.pt"])
    near = [a for a in out["actions"] if a["action"] == "skipped"]
    assert [Path(a["path"]).name for a in near] == ["anime-fp16.safetensors"] and "fp16 rounding" in near[0]["reason"]
    assert (folder / "animevae.safetensors").exists()
    after = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                   for root in (folder, dest) for p in root.rglob("*") if p.is_file())
    assert after == before  # every byte still somewhere
    # report mode touches nothing; only the near duplicate is left, labelled as such
    rc = main(["dedup", str(folder), "--kind", "vae", "--cache", cache])
    assert "near duplicates" in capsys.readouterr().out


def test_kind_filter_and_checkpoint_dedup(fixture_files, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(fixture_files["sd1"], d / "model.safetensors")
    shutil.copy(fixture_files["sd1_fp16"], d / "model-fp16.safetensors")
    shutil.copy(fixture_files["vae"], d / "vae.safetensors")
    with HashCache(tmp_path / "c.sqlite") as cache:
        only_vae = scan([d], "vae", cache)
        assert [Path(f.path).name for f in only_vae.files] == ["vae.safetensors"] and only_vae.skipped_kind == 2
        ck = dedup([d], "checkpoint", cache=cache)
    assert len(ck.groups) == 1 and ck.groups[0].keeper.name == "model.safetensors"
    assert ck.groups[0].match == "near"  # an fp32 file and its fp16 copy


def test_api_dedup_requires_confirm_and_stays_inside(tmp_path, folder, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    shutil.rmtree(root / "VAE")
    shutil.copytree(folder, root / "VAE")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    client = TestClient(app)
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["groups"]) == 1 and body["table"]["rows"][0][2] == "keep"
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "action": "hardlink"})
    assert r.status_code == 422 and "confirm" in r.json()["detail"]
    assert not os.path.samefile(root / "VAE" / "animevae.safetensors",
                                root / "VAE" / "sub" / "orangemix.vae.safetensors")
    for bad in ({"kind": "vae", "folders": ["../"]}, {"kind": "vae", "folders": [str(tmp_path)]},
                {"kind": "vae", "action": "move", "to": "/tmp", "confirm": True},
                {"kind": "vae", "action": "move", "to": "../../x", "confirm": True}):
        r = client.post("/sdtoolkit/v1/dedup", json=bad)
        assert r.status_code == 403, (bad, r.text)
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "action": "move", "to": "duplicates",
                                                 "confirm": True})
    assert r.status_code == 200, r.text
    assert (root / "VAE" / "duplicates" / "Anything-V3.0.vae.pt").exists()
