"""Issue 11, data loss and the write gate: destructive dedup actions verify the files themselves at the moment
of acting (never the hash cache); the cache keys on ctime, survives a damaged database and an unwritable place;
moves never turn a link into a copy nor leave links dangling; every client-named output lands, symlinks
resolved, inside a configured folder; NaN/Inf multipliers are refused; temporary outputs of killed writers are
swept; a .ckpt output on a full disk is a clean error."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lib_sdtoolkit.cli import main
from lib_sdtoolkit.dedup import apply_action, content_hash, dedup, find_duplicates, scan
from lib_sdtoolkit.errors import InvalidInputError
from lib_sdtoolkit.files import load_state_dict, save_safetensors
from lib_sdtoolkit.files.hash_cache import HashCache, cached_hash_file

REPO = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _rewrite_keeping_size_and_mtime(p: Path, flip: int = 0x5A) -> None:
    """Change bytes inside a tensor of a safetensors file, then put size and mtime back (rsync -t, cp -p, tar x)."""
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    n = int.from_bytes(data[:8], "little")
    pos = 8 + n + 64  # inside the first tensor's data
    data[pos:pos + 16] = bytes((b ^ flip) for b in data[pos:pos + 16])
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(p)
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.fixture()
def twins(tmp_path, fixture_files):
    d = tmp_path / "VAE"
    d.mkdir()
    shutil.copy(fixture_files["vae"], d / "a.safetensors")
    shutil.copy(fixture_files["vae"], d / "b.safetensors")
    return d


# ------------------------------------------------------------------------------------------------ hardlink

def test_hardlink_never_trusts_a_cache_fooled_by_utime(twins, tmp_path):
    cache_path = tmp_path / "c.sqlite"
    with HashCache(cache_path) as cache:
        first = dedup([twins], "vae", cache=cache)
        assert first.groups and first.groups[0].match == "bytes"
        old_sha = cached_hash_file(twins / "b.safetensors", ["sha256"], cache).sha256
    b = twins / "b.safetensors"
    _rewrite_keeping_size_and_mtime(b)
    new_bytes = b.read_bytes()
    with HashCache(cache_path) as cache:
        run = dedup([twins], "vae", action="hardlink", cache=cache)
    assert not [a for a in run.actions if a.action == "hardlinked"]
    assert b.read_bytes() == new_bytes and not os.path.samefile(twins / "a.safetensors", b)
    _rewrite_keeping_size_and_mtime(b, 0x33)  # and once more, now that the scan above cached the new bytes
    with HashCache(cache_path) as cache:
        res = cached_hash_file(b, ["sha256"], cache)  # `hash` must not answer the stale value
        assert res.source != "cache" and res.sha256 == _sha(b) != old_sha


def test_hardlink_refuses_a_file_changed_between_scan_and_action(twins, tmp_path):
    with HashCache(tmp_path / "c.sqlite") as cache:
        rep = scan([twins], "vae", cache)
    groups = find_duplicates(rep.files)
    assert groups and groups[0].match == "bytes"
    b = twins / "b.safetensors"
    _rewrite_keeping_size_and_mtime(b)  # the scan's stat check cannot see this
    new_bytes = b.read_bytes()
    acts = apply_action(groups, "hardlink")
    assert [a.action for a in acts] == ["skipped"] and "differ" in acts[0].reason
    assert b.read_bytes() == new_bytes and not os.path.samefile(twins / "a.safetensors", b)
    assert sorted(p.name for p in twins.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temp link left


# ------------------------------------------------------------------------------------------------ the cache

def test_damaged_cache_is_set_aside_and_rebuilt(twins, tmp_path, capsys):
    cache_path = tmp_path / "cache" / "hashes.sqlite"
    with HashCache(cache_path) as cache:
        for i in range(200):  # a few pages of entries
            cache.store(twins / f"x{i}.safetensors", os.stat(twins / "a.safetensors"), hashes={"sha256": "0" * 64,
                                                                                           "pad": "y" * 400})
    raw = bytearray(cache_path.read_bytes())
    assert len(raw) > 4 * 4096
    raw[3 * 4096:3 * 4096 + 2048] = b"\xff" * 2048  # a corrupted page
    cache_path.write_bytes(bytes(raw))
    db = sqlite3.connect(str(cache_path))
    try:  # the file really is damaged
        damaged = db.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError:
        damaged = True
    finally:
        db.close()
    assert damaged
    rc = main(["hash", str(twins / "a.safetensors"), "--cache", str(cache_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["sha256"] == _sha(twins / "a.safetensors")
    assert "Traceback" not in err
    aside = [p.name for p in cache_path.parent.iterdir() if ".corrupt-" in p.name]
    assert aside and aside[0].startswith("hashes.sqlite.corrupt-")
    with HashCache(cache_path) as cache:  # rebuilt: works and caches again
        assert cache.warning is None and cache.enabled
        assert cached_hash_file(twins / "a.safetensors", ["sha256"], cache).source == "cache"
    assert main(["dedup", str(twins), "--cache", str(cache_path)]) == 0


def test_unwritable_cache_place_hashes_without_caching(twins, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    cache = HashCache(blocker / "hashes.sqlite")
    assert not cache.enabled and "not used" in cache.warning
    res = cached_hash_file(twins / "a.safetensors", ["sha256"], cache)
    assert res.sha256 == _sha(twins / "a.safetensors")
    cache.close()
    rc = main(["dedup", str(twins), "--cache", str(blocker / "hashes.sqlite")])
    out, err = capsys.readouterr()
    assert rc == 0 and "identical bytes" in out and "Traceback" not in err


def _make_read_only(paths) -> list:
    """chmod a-w; as root (who writes through permission bits) also ``chattr +i``: an immutable file or folder that
    nobody writes. Returns the paths made immutable (to undo)."""
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.geteuid() != 0:
        return []
    done = []
    for p in paths:
        r = subprocess.run(["chattr", "+i", str(p)], capture_output=True, text=True) if shutil.which("chattr") \
            else None
        if r is None or r.returncode != 0:
            _undo_read_only(done)
            pytest.skip(f"running as root and cannot make {p} immutable (chattr +i: "
                        f"{r.stderr.strip() if r else 'not installed'})")
        done.append(p)
    return done


def _undo_read_only(immutable) -> None:
    for p in immutable:
        subprocess.run(["chattr", "-i", str(p)], capture_output=True)


def test_read_only_cache_hashes_without_caching(twins, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with HashCache(ro / "hashes.sqlite") as cache:
        cached_hash_file(twins / "a.safetensors", ["sha256"], cache)
    files = sorted(ro.iterdir())
    before = {p.name: p.read_bytes() for p in files}
    immutable = _make_read_only(files + [ro])
    try:
        with open(ro / "hashes.sqlite", "r+b"):  # the set-up holds: this process cannot write there
            pass
    except OSError:
        pass
    else:
        raise AssertionError("the cache file is still writable: the test would not test anything")
    try:
        with HashCache(ro / "hashes.sqlite") as cache:
            assert not cache.enabled and "not used" in cache.warning
            res = cached_hash_file(twins / "b.safetensors", ["sha256"], cache)
            assert res.sha256 == _sha(twins / "b.safetensors") and res.source != "cache"
        assert {p.name: p.read_bytes() for p in sorted(ro.iterdir())} == before  # nothing written, nothing added
    finally:
        _undo_read_only(immutable)
        ro.chmod(0o755)
        for p in files:
            p.chmod(0o644)


# ------------------------------------------------------------------------------------------------ move

def test_move_keeps_a_file_that_differs_by_one_ulp(tmp_path, fixture_files):
    d = tmp_path / "VAE"
    d.mkdir()
    shutil.copy(fixture_files["vae"], d / "a.safetensors")
    sd = load_state_dict(fixture_files["vae"])
    k = next(k for k, t in sd.items() if t.is_floating_point() and t.numel() > 4)
    w = sd[k].clone()
    flat = w.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))  # 1 ulp in fp32
    sd[k] = w
    save_safetensors(d / "a_ulp.safetensors", sd)
    assert content_hash(d / "a.safetensors").hash == content_hash(d / "a_ulp.safetensors").hash  # fp16-equal
    dest = tmp_path / "dups"
    dest.mkdir()
    res = dedup([d], "vae", action="move", to=dest)
    assert (d / "a_ulp.safetensors").exists() and list(dest.iterdir()) == []
    assert torch.equal(load_state_dict(d / "a_ulp.safetensors")[k], w)
    assert [a.action for a in res.actions] == ["skipped"] and "fp16 rounding" in res.actions[0].reason
    assert res.groups and res.groups[0].match == "near"  # reported, labelled as a near duplicate


def test_move_never_turns_a_link_into_a_copy(tmp_path, fixture_files):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to link onto")
    d = tmp_path / "VAE"
    d.mkdir()
    shutil.copy(fixture_files["vae"], d / "a.safetensors")
    target = shm / f"sdt-test-{os.getpid()}-{tmp_path.name}.safetensors"
    shutil.copy(fixture_files["vae"], target)
    try:
        (d / "b_link.safetensors").symlink_to(target)
        dest = tmp_path / "dups"
        dest.mkdir()
        for _ in range(2):  # idempotent: the second run finds the same state
            res = dedup([d], "vae", action="move", to=dest)
            assert [a.action for a in res.actions] == ["skipped"] and "symbolic link" in res.actions[0].reason
            assert os.path.islink(d / "b_link.safetensors") and target.exists() and list(dest.iterdir()) == []
    finally:
        target.unlink()


def test_move_leaves_no_in_folder_link_dangling(twins, tmp_path):
    (twins / "c_link.safetensors").symlink_to("b.safetensors")
    dest = tmp_path / "dups"
    dest.mkdir()
    res = dedup([twins], "vae", action="move", to=dest)
    b = [a for a in res.actions if a.path.endswith("b.safetensors")]
    assert b and b[0].action == "skipped" and "dangling" in b[0].reason
    assert (twins / "c_link.safetensors").resolve().exists() and list(dest.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the write gate

@pytest.fixture()
def linked_host(tmp_path, fixture_files):
    from lib_sdtoolkit.host import StandaloneHost

    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    ck = host.model_dirs("checkpoint")[0]
    shutil.copy(fixture_files["vae"], host.model_dirs("vae")[0] / "v.safetensors")
    shutil.copy(fixture_files["vae"], host.model_dirs("vae")[0] / "v2.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    (ck / "linkdir").symlink_to(outside, target_is_directory=True)
    (host.model_dirs("vae")[0] / "linkdir").symlink_to(outside, target_is_directory=True)
    return host, outside


def _client(host):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.server import make_router

    app = FastAPI()
    app.include_router(make_router(host))
    return TestClient(app, raise_server_exceptions=False)


def test_outputs_through_a_symlinked_folder_are_refused(linked_host, tmp_path, monkeypatch):
    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    host, outside = linked_host
    c = _client(host)
    r = c.post("/sdtoolkit/v1/prune", json={"path": "v.safetensors", "kind": "vae", "output": "linkdir/x.safetensors"})
    assert r.status_code == 403, r.text
    assert "outside" in r.json()["detail"]
    r = c.post("/sdtoolkit/v1/prune", json={"path": "v.safetensors", "kind": "vae",
                                            "output": str(host.model_dirs("vae")[0] / "linkdir" / "y.safetensors")})
    assert r.status_code == 403, r.text
    r = c.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "action": "move", "to": "linkdir", "confirm": True})
    assert r.status_code == 403, r.text
    assert list(outside.iterdir()) == []
    from lib_sdtoolkit.outputs import resolve_output

    for kind in ("checkpoint", "vae"):
        with pytest.raises(Exception) as e:
            resolve_output(host, "linkdir/z.safetensors", kind)
        assert getattr(e.value, "http_status", None) == 403
        with pytest.raises(Exception) as e:  # the gate every job uses (prune's output included)
            host.resolve_output("linkdir/z.safetensors", kind, suffixes=(".safetensors",))
        assert getattr(e.value, "http_status", None) == 403
    # the same outputs without the link still work
    r = c.post("/sdtoolkit/v1/prune", json={"path": "v.safetensors", "kind": "vae", "output": "ok.safetensors"})
    assert r.status_code == 200, r.text
    assert (host.model_dirs("vae")[0] / "ok.safetensors").is_file() and list(outside.iterdir()) == []


def test_dedup_to_bad_names_are_clean_errors(linked_host, tmp_path, monkeypatch):
    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    host, outside = linked_host
    c = _client(host)
    for bad in ("v.safetensors", "no/such/nested", "   ", "\t"):
        r = c.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "action": "move", "to": bad, "confirm": True})
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
        assert "detail" in r.json()
    assert (host.model_dirs("vae")[0] / "v.safetensors").is_file()
    # a duplicate reached through a symlinked folder that leads outside is reported, never replaced
    w = outside / "w.safetensors"
    shutil.copy(host.model_dirs("vae")[0] / "v.safetensors", w)
    r = c.post("/sdtoolkit/v1/dedup", json={"kind": "vae", "action": "hardlink", "confirm": True})
    assert r.status_code == 200, r.text
    acts = {Path(a["path"]).name: a for a in r.json()["actions"]}
    assert acts["v2.safetensors"]["action"] == "hardlinked"
    assert acts["w.safetensors"]["action"] == "skipped" and "outside" in acts["w.safetensors"]["reason"]
    assert os.stat(w).st_nlink == 1


# ------------------------------------------------------------------------------------------------ NaN / Inf

def test_bake_refuses_non_finite_multipliers(fixture_files, tmp_path):
    from lib_sdtoolkit.files import open_model
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.synth import make_lora_state_dict

    base = fixture_files["sd1_fp16"]
    with open_model(base) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    sd = make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=2, seed=3,
                              name_filter=lambda n: "attn2_to_v" in n)
    lp = save_safetensors(tmp_path / "l.safetensors", sd)
    out = tmp_path / "b.safetensors"
    for m in ("nan", "inf", "-inf"):
        assert main(["lora", "bake", str(base), f"{lp}:{m}", "-o", str(out), "-q"]) == 2
        with pytest.raises(InvalidInputError, match="finite"):
            bake(base, [(lp, float(m))], out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]
    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    shutil.copy(base, host.model_dirs("checkpoint")[0] / "base.safetensors")
    shutil.copy(lp, host.model_dirs("lora")[0] / "l.safetensors")
    c = _client(host)
    body = json.dumps({"checkpoint": "base", "loras": [{"lora": "l", "multiplier": float("nan")}], "output": "o"})
    r = c.post("/sdtoolkit/v1/lora/bake", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert not (host.model_dirs("checkpoint")[0] / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------------ temp files

_WRITER = textwrap.dedent("""
    import sys, time
    from lib_sdtoolkit.files import StreamingSafetensorsWriter, open_model
    src, out = sys.argv[1], sys.argv[2]
    with open_model(src) as r:
        infos, keys = r.infos(), r.keys()
        with StreamingSafetensorsWriter(out, [infos[k] for k in keys]) as w:
            for i, k in enumerate(keys):
                w.write(k, r.get(k))
                if i == len(keys) // 2:
                    print("half", flush=True)
                    time.sleep(120)
""")


def test_killed_writer_temp_files_are_swept(fixture_files, tmp_path, capsys):
    import re

    from lib_sdtoolkit.host import StandaloneHost

    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    vae_dir = host.model_dirs("vae")[0]
    out = vae_dir / "out.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(fixture_files["vae"]), str(out)], cwd=str(REPO),
                         stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "half"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
        p.stdout.close()
    temps = [f for f in vae_dir.iterdir() if f.name != "out.safetensors"]
    assert len(temps) == 1 and not out.exists()
    m = re.match(r"^(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$", temps[0].name)  # OUT.<pid>.<hex>.tmp
    assert m and int(m.group("pid")) == p.pid and m.group("target") == "out.safetensors"
    assert temps[0].stat().st_size > 0
    stale = temps[0]
    # files that are not ours, or whose writer still runs, are never touched
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        keep = [vae_dir / f"x.safetensors.{live.pid}.0123abcd.tmp", vae_dir / "notes.12345.tmp",
                vae_dir / f"y.safetensors.{p.pid}.0123abcd.tmp.bak", vae_dir / f"z.{p.pid}.ABCDEF12.tmp"]
        for f in keep:
            f.write_bytes(b"not ours to remove")
        # a later write into the folder removes the killed writer's temp file
        save_safetensors(vae_dir / "other.safetensors", {"x": torch.ones(2)})
        assert not stale.exists() and all(f.exists() for f in keep)
        # inspect (CLI and API) and serve start report what they removed
        shutil.copy(fixture_files["vae"], vae_dir / "v.safetensors")
        stale.write_bytes(b"partial")
        assert main(["inspect", str(vae_dir / "v.safetensors")]) == 0
        assert str(stale) in capsys.readouterr().err and not stale.exists()
        stale.write_bytes(b"partial")
        r = _client(host).get("/sdtoolkit/v1/inspect", params={"path": "v.safetensors", "kind": "vae"})
        assert r.status_code == 200 and r.json()["stale_temps_removed"] == [stale.name]
        sub = host.model_dirs("checkpoint")[0] / "sub"
        sub.mkdir()
        (sub / stale.name).write_bytes(b"partial")
        from lib_sdtoolkit.outputs import sweep_host_temps
        assert sweep_host_temps(host) == [sub / stale.name]
        assert all(f.exists() for f in keep)
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------------ full disk

def test_ckpt_output_on_a_full_disk_is_a_clean_error(fixture_files, tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail (EFBIG), as a full disk does, without root."""
    code = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        from lib_sdtoolkit.cli import main
        sys.exit(main(["prune", sys.argv[1], "-o", sys.argv[2], "--dtype", "fp32"]))
    """)
    outdir = tmp_path / "out"
    outdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code, str(fixture_files["vae"]), str(outdir / "v.ckpt")],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert os.path.getsize(fixture_files["vae"]) > 100_000
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "v.ckpt" in r.stderr and "partial output was removed" in r.stderr
    assert list(outdir.iterdir()) == []


def test_cache_of_another_schema_is_never_shared_nor_written(tmp_path, monkeypatch, fixture_files):
    """Real A1111: a cache folder shared by two copies of the toolkit (schema 1 and 2) failed every write of the
    older one ('table files has 6 columns but 5 values'), and <sdtlora> stopped applying. Each schema now has its
    own default file, and a database that says it is newer is left alone (hashing goes on without it)."""
    import sqlite3

    from lib_sdtoolkit.files.hash_cache import DEFAULT_NAME, HashCache
    from lib_sdtoolkit.files.hashes import hash_file

    folder = tmp_path / "cache"
    folder.mkdir()
    old = folder / "hashes.sqlite"          # what schema 1 wrote, still used by an older extension
    db = sqlite3.connect(str(old))
    db.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ino INTEGER, data TEXT)")
    db.execute("INSERT INTO files VALUES ('x', 1, 2, 3, '{}')")
    db.commit()
    db.close()
    before = old.read_bytes()
    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(folder))
    with HashCache() as cache:
        assert cache.enabled and cache.path.name == DEFAULT_NAME != "hashes.sqlite"
    assert old.read_bytes() == before       # the older copy's table is untouched

    newer = tmp_path / "newer.sqlite"
    db = sqlite3.connect(str(newer))
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '99')")
    db.execute("CREATE TABLE files (path TEXT PRIMARY KEY, a, b, c, d, e, f, g)")
    db.commit()
    db.close()
    newer_bytes = newer.read_bytes()
    with HashCache(newer) as cache:
        assert not cache.enabled and "newer" in (cache.warning or "")
    assert newer.read_bytes() == newer_bytes
    src = fixture_files["vae"]
    assert hash_file(src, ["sha256"]).sha256
