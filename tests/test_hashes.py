"""File hashes against coreutils and independent hashlib / zlib / blake3 computations; the hash cache (hits read no
file data, changes while hashing are reported and not cached); the WebUI's own cache layout (read back through the
WebUI double's modules.hashes); the hash CLI and API."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import blake3
import pytest

from lib_sdtoolkit.cli import main
from lib_sdtoolkit.files.hash_cache import HashCache, WebUIHashCache, cached_hash_file, webui_title
from lib_sdtoolkit.files.hashes import hash_file, normalize_algos, sha256_file


def _independent(path: Path) -> dict:
    """Every algorithm from its published definition, with the reference libraries, in separate reads."""
    data = path.read_bytes()
    out = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "autov1": hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8],
        "blake3": blake3.blake3(data).hexdigest(),
        "crc32": format(zlib.crc32(data) & 0xFFFFFFFF, "08x"),
        "autov3": None,
    }
    with open(path, "rb") as fh:  # the WebUI's addnet_hash_safetensors, step by step
        n = struct.unpack("<Q", fh.read(8))[0]
        first = fh.read(1)
        if first == b"{":
            fh.seek(8 + n)
            out["autov3"] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def blob(tmp_path_factory) -> Path:
    """3.3 MB of pseudo-random bytes: covers the AutoV1 window and several unaligned chunks."""
    p = tmp_path_factory.mktemp("blobs") / "random.bin"
    import random

    rnd = random.Random(1234)
    p.write_bytes(bytes(rnd.getrandbits(8) for _ in range(200_000)) * 16 + b"tail")
    return p


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("chunk", [4096 + 7, 1 << 20])
def test_all_hashes_match_independent_computations(fixture_files, blob, threads, chunk):
    files = [blob, fixture_files["vae"], fixture_files["vae_prefixed_pt"]]
    for p in files:
        res = hash_file(p, threads=threads, chunk_size=chunk)
        ref = _independent(p)
        assert not res.changed
        for algo in ("sha256", "autov1", "autov3", "blake3", "crc32"):
            assert getattr(res, algo) == ref[algo], (p, algo)
        assert res.autov2 == ref["sha256"][:10]
    # AutoV3 applies to safetensors only, and there it differs from the file sha256
    st = hash_file(fixture_files["vae"])
    assert st.autov3 is not None and st.autov3 != st.sha256
    assert hash_file(fixture_files["vae_prefixed_pt"]).autov3 is None


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum not installed")
def test_sha256_matches_coreutils(fixture_files, blob):
    for p in (blob, fixture_files["vae"], fixture_files["vae_prefixed_pt"]):
        out = subprocess.run(["sha256sum", str(p)], check=True, capture_output=True, text=True).stdout
        assert sha256_file(p) == out.split()[0]


def test_autov1_on_short_files_matches_the_webui_rule(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)  # shorter than 0x100000: the WebUI hashes the empty read
    assert hash_file(small).autov1 == hashlib.sha256(b"").hexdigest()[:8]
    partial = tmp_path / "partial.bin"
    partial.write_bytes(bytes(range(256)) * 4200)  # ends inside the 64 KiB window
    data = partial.read_bytes()
    assert hash_file(partial, chunk_size=4096).autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    r = hash_file(empty)
    assert r.sha256 == hashlib.sha256(b"").hexdigest() and r.crc32 == "00000000" and r.autov3 is None


def test_algo_selection_and_aliases():
    assert normalize_algos(["autov2"]) == ("sha256",)
    assert normalize_algos(["crc32,addnet", "legacy"]) == ("autov1", "autov3", "crc32")
    assert normalize_algos(["all"]) == ("sha256", "autov1", "autov3", "blake3", "crc32")
    with pytest.raises(Exception, match="unknown hash algorithm 'md5'"):
        normalize_algos(["md5"])


def test_civitai_names(fixture_files):
    r = hash_file(fixture_files["vae"])
    c = r.civitai()
    assert c["SHA256"] == r.sha256.upper() and c["AutoV2"] == r.sha256[:10].upper()
    assert c["AutoV1"] == r.autov1.upper() and c["AutoV3"] == r.autov3.upper() and c["CRC32"] == r.crc32.upper()


# ------------------------------------------------------------------------------------------------ cache

class _OpenSpy:
    """Counts every open of a watched path through builtins.open, io.open and os.open."""

    def __init__(self, monkeypatch, watched):
        self.watched = {os.path.realpath(p) for p in watched}
        self.hits = []
        real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

        def check(file):
            if isinstance(file, (str, bytes, os.PathLike)):
                if os.path.realpath(os.fsdecode(os.fspath(file))) in self.watched:
                    self.hits.append(os.fspath(file))

        def spy_open(file, *a, **k):
            check(file)
            return real_open(file, *a, **k)

        def spy_io_open(file, *a, **k):
            check(file)
            return real_io_open(file, *a, **k)

        def spy_os_open(file, *a, **k):
            check(file)
            return real_os_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_io_open)
        monkeypatch.setattr(os, "open", spy_os_open)


def test_cache_hit_reads_no_file_data(tmp_path, blob, monkeypatch):
    target = tmp_path / "model.bin"
    shutil.copy(blob, target)
    with HashCache(tmp_path / "c.sqlite") as cache:
        first = cached_hash_file(target, None, cache)
        assert first.source == "computed" and not first.changed
        spy = _OpenSpy(monkeypatch, [target])
        second = cached_hash_file(target, None, cache)
        assert spy.hits == []  # nothing opened the file: a cache hit is a stat and a row
        assert second.source == "cache"
        assert second.values() == first.values()
        # the spy does see a real read (so the empty list above means something)
        os.utime(target, ns=(first.mtime_ns + 1_000_000_000, first.mtime_ns + 1_000_000_000))
        third = cached_hash_file(target, None, cache)
        assert third.source == "computed" and spy.hits
    # the cache persists across processes' worth of reopen
    with HashCache(tmp_path / "c.sqlite") as cache:
        assert cache.get_hashes(target) is not None


def test_cache_invalid_when_content_changes_with_same_size(tmp_path, blob):
    target = tmp_path / "m.bin"
    shutil.copy(blob, target)
    with HashCache(tmp_path / "c.sqlite") as cache:
        a = cached_hash_file(target, ["sha256"], cache)
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(a.mtime_ns + 2_000_000_000,) * 2)
        b = cached_hash_file(target, ["sha256"], cache)
        assert b.source == "computed" and b.sha256 == hashlib.sha256(bytes(data)).hexdigest() != a.sha256
        # asking for an algorithm the cache lacks reads the file again, once, for everything asked
        c = cached_hash_file(target, ["sha256", "blake3"], cache)
        assert c.source == "computed" and c.blake3 == blake3.blake3(bytes(data)).hexdigest()


def test_file_changed_while_hashing_is_reported_not_cached(tmp_path, blob, capsys):
    target = tmp_path / "growing.bin"
    shutil.copy(blob, target)
    calls = []

    def grow(done, total):
        if not calls:
            with open(target, "ab") as fh:
                fh.write(b"more data arriving")
        calls.append(done)

    for threads in (False, True):
        with HashCache(tmp_path / f"c{threads}.sqlite") as cache:
            calls.clear()
            shutil.copy(blob, target)
            res = cached_hash_file(target, None, cache, progress=lambda d, t: grow(d, t)) if not threads else None
            if threads:
                r = hash_file(target, threads=True, chunk_size=1 << 16, progress=grow)
                assert r.changed
                assert not cache.put_hashes(r)
                res = r
            assert res.changed
            assert len(cache) == 0


def test_cli_hash_reports_a_changed_file(tmp_path, blob, capsys, monkeypatch):
    import lib_sdtoolkit.files.hash_cache as hc

    target = tmp_path / "moving.bin"
    shutil.copy(blob, target)
    real = hc.hash_file

    def hash_then_touch(path, algos=None, **kw):
        res = real(path, algos, **kw)
        os.utime(path, ns=(res.mtime_ns + 5_000_000_000,) * 2)  # after the read: what a writer does
        return real(path, algos, progress=lambda d, t: os.utime(path, ns=(res.mtime_ns + 9_000_000_000,) * 2)
                    if d == t else None)

    monkeypatch.setattr(hc, "hash_file", hash_then_touch)
    rc = main(["hash", str(target), "--cache", str(tmp_path / "c.sqlite")])
    err = capsys.readouterr().err
    assert rc == 2 and "changed while it was hashed" in err
    with HashCache(tmp_path / "c.sqlite") as cache:
        assert len(cache) == 0


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_hash_json_and_bad_input(tmp_path, fixture_files, capsys):
    cache = str(tmp_path / "c.sqlite")
    rc = main(["hash", str(fixture_files["vae"]), "--json", "--cache", cache])
    out = json.loads(capsys.readouterr().out)
    ref = _independent(fixture_files["vae"])
    assert rc == 0 and out["sha256"] == ref["sha256"] and out["autov3"] == ref["autov3"]
    assert out["civitai"]["AutoV2"] == ref["sha256"][:10].upper()
    rc = main(["hash", str(fixture_files["vae"]), "--algo", "crc32", "--json", "--cache", cache])
    assert rc == 0 and json.loads(capsys.readouterr().out)["crc32"] == ref["crc32"]
    assert main(["hash", str(tmp_path / "missing.safetensors"), "--no-cache"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["hash", str(fixture_files["vae"]), "--algo", "md5", "--no-cache"]) == 2
    assert "unknown hash algorithm" in capsys.readouterr().err
    # a folder: every model file inside, one unreadable file does not stop the others
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(fixture_files["vae"], d / "a.safetensors")
    (d / "b.ckpt").write_bytes(b"")
    os.chmod(d / "b.ckpt", 0)
    rc = main(["hash", str(d), "--json", "--no-cache"])
    res = json.loads(capsys.readouterr().out)
    if os.geteuid() != 0:  # root reads anything
        assert rc == 2
    assert [Path(r["path"]).name for r in (res if isinstance(res, list) else [res])][0] == "a.safetensors"


# ------------------------------------------------------------------------------------------------ WebUI cache

def _webui_modules(data_dir: Path):
    pytest.importorskip("diskcache", reason="the WebUI's hash cache needs diskcache (the WebUI pins 5.6.3)")
    sys.path.insert(0, str(Path(__file__).parent / "webui_double"))
    try:
        from webui_harness import use_double
    finally:
        sys.path.pop(0)
    use_double()
    import modules.cache
    import modules.hashes

    for c in modules.cache.caches.values():
        c.close()
    modules.cache.caches.clear()
    modules.cache.cache_dir = str(data_dir / "cache")
    modules.cache.cache_filename = str(data_dir / "cache.json")
    return modules.cache, modules.hashes


def test_webui_diskcache_entries_are_what_the_webui_reads(tmp_path, fixture_files):
    data = tmp_path / "webui"
    ckdir = data / "models" / "Stable-diffusion"
    (ckdir / "sub").mkdir(parents=True)
    lora_dir = data / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    ck = ckdir / "sub" / "model.safetensors"
    shutil.copy(fixture_files["vae"], ck)
    lora_st = lora_dir / "style.safetensors"
    shutil.copy(fixture_files["vae"], lora_st)
    lora_pt = lora_dir / "old.pt"
    shutil.copy(fixture_files["vae_prefixed_pt"], lora_pt)
    (data / "cache").mkdir()
    w = WebUIHashCache(data)
    assert w.backend == "diskcache"
    results = {p: hash_file(p) for p in (ck, lora_st, lora_pt)}
    assert w.record("checkpoint", [results[ck]], [ckdir]) == 1
    assert w.record("lora", [results[lora_st], results[lora_pt]]) == 2
    w.close()
    assert webui_title("checkpoint", ck, [ckdir]) == "checkpoint/" + os.path.join("sub", "model.safetensors")
    cache_mod, hashes_mod = _webui_modules(data)
    ref = _independent(ck)
    # the WebUI's own lookup (CheckpointInfo: title checkpoint/<name>; Lora: lora/<stem>, addnet for safetensors)
    assert hashes_mod.sha256_from_cache(str(ck), "checkpoint/" + os.path.join("sub", "model.safetensors")) == \
        ref["sha256"]
    assert hashes_mod.sha256_from_cache(str(lora_st), "lora/style", use_addnet_hash=True) == \
        _independent(lora_st)["autov3"]
    assert hashes_mod.sha256_from_cache(str(lora_pt), "lora/old") == _independent(lora_pt)["sha256"]
    # and a value the WebUI computed itself is what we read back
    other = ckdir / "other.safetensors"
    shutil.copy(fixture_files["vae"], other)
    webui_value = hashes_mod.sha256(str(other), "checkpoint/other.safetensors")
    assert WebUIHashCache(data).sha256(other, "checkpoint/other.safetensors") == webui_value == ref["sha256"]
    # a file newer than its entry is not trusted, by the WebUI nor by us
    st = os.stat(ck)
    os.utime(ck, ns=(st.st_mtime_ns + 3_000_000_000,) * 2)
    assert hashes_mod.sha256_from_cache(str(ck), "checkpoint/" + os.path.join("sub", "model.safetensors")) is None
    for c in cache_mod.caches.values():
        c.close()
    cache_mod.caches.clear()


def test_webui_legacy_cache_json(tmp_path, fixture_files):
    data = tmp_path / "webui"
    ckdir = data / "models" / "Stable-diffusion"
    ckdir.mkdir(parents=True)
    ck = ckdir / "m.ckpt"
    shutil.copy(fixture_files["vae_prefixed_pt"], ck)
    (data / "cache.json").write_text(json.dumps({"hashes": {"checkpoint/old.ckpt": {"mtime": 1.0, "sha256": "ab"}},
                                                 "safetensors-metadata": {"x": {"mtime": 1, "value": {}}}}))
    w = WebUIHashCache(data)
    assert w.backend == "json"
    res = hash_file(ck)
    w.record("checkpoint", [res], [ckdir])
    written = json.loads((data / "cache.json").read_text())
    assert written["hashes"]["checkpoint/m.ckpt"] == {"mtime": os.path.getmtime(ck), "sha256": res.sha256}
    assert written["hashes"]["checkpoint/old.ckpt"]["sha256"] == "ab"  # other entries kept
    assert "safetensors-metadata" in written
    assert w.sha256(ck, "checkpoint/m.ckpt") == hashlib.sha256(ck.read_bytes()).hexdigest()
    # a 1.8+ WebUI converts it into its cache folder on first use, our entry included
    cache_mod, hashes_mod = _webui_modules(data)
    assert hashes_mod.sha256_from_cache(str(ck), "checkpoint/m.ckpt") == res.sha256
    for c in cache_mod.caches.values():
        c.close()
    cache_mod.caches.clear()


def test_cli_hash_writes_webui_cache(tmp_path, fixture_files, capsys):
    pytest.importorskip("diskcache")
    data = tmp_path / "webui"
    ckdir = data / "models" / "Stable-diffusion"
    ckdir.mkdir(parents=True)
    ck = ckdir / "m.safetensors"
    shutil.copy(fixture_files["vae"], ck)
    rc = main(["hash", str(ck), "--webui-dir", str(data), "--no-cache"])
    assert rc == 0 and "1 entries written" in capsys.readouterr().out
    assert WebUIHashCache(data).sha256(ck, "checkpoint/m.safetensors") == _independent(ck)["sha256"]


# ------------------------------------------------------------------------------------------------ API

@pytest.fixture()
def api(tmp_path, fixture_files, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    shutil.copy(fixture_files["vae"], root / "VAE" / "a.safetensors")
    shutil.copy(fixture_files["vae"], tmp_path / "outside.safetensors")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    return TestClient(app), root, tmp_path


def test_api_hash_and_path_restrictions(api):
    client, root, tmp = api
    r = client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"], "kind": "vae"})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = _independent(root / "VAE" / "a.safetensors")
    assert body["results"][0]["sha256"] == ref["sha256"] and body["results"][0]["kind"] == "vae"
    assert body["results"][0]["autov3"] == ref["autov3"]
    r2 = client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"]})
    assert r2.json()["results"][0]["source"] == "cache"
    for bad in ("../outside.safetensors", "VAE/../../outside.safetensors", str(tmp / "outside.safetensors"),
                "/etc/passwd"):
        r = client.post("/sdtoolkit/v1/hash", json={"paths": [bad]})
        assert r.status_code == 403, (bad, r.text)
    assert client.post("/sdtoolkit/v1/hash", json={"paths": ["nope.safetensors"]}).status_code == 404
    assert client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"], "algos": ["md5"]}).status_code == 422


def test_webui_host_mirrors_hashes_into_its_own_data_dir(tmp_path, fixture_files, monkeypatch):
    """The WebUI host knows its data folder (paths.data_path): hashes from the tab/API land in that WebUI's cache,
    found by the WebUI's own lookup; nothing global decides where."""
    from types import SimpleNamespace

    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.host import webui_host_from

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # our own cache goes to a fresh place too
    data = tmp_path / "webui-data"
    ckdir = data / "models" / "Stable-diffusion"
    ckdir.mkdir(parents=True)
    (data / "cache").mkdir()
    ck = ckdir / "model.safetensors"
    shutil.copy(fixture_files["vae"], ck)
    host = webui_host_from(SimpleNamespace(models_path=str(data / "models"), data_path=str(data)),
                           SimpleNamespace())
    assert host.webui_data_dir == data
    rep = jobs.run("hash", host, {"paths": ["model.safetensors"], "kind": "checkpoint"})
    assert rep.webui_cache_entries == 1 and not rep.problems
    _cache, hashes_mod = _webui_modules(data)
    assert hashes_mod.sha256_from_cache(str(ck), "checkpoint/model.safetensors") == _independent(ck)["sha256"]


def test_each_whole_file_hash_has_its_own_lane(tmp_path):
    """Issue 17.3: sha256, AutoV3, BLAKE3 and CRC32 each on their own thread (AutoV1, 64 KiB, rides with CRC32);
    fewer algorithms, fewer lanes; the threaded pass gives the same values as the single-threaded one."""
    from lib_sdtoolkit.files import hashes as H

    sinks = [H._Sha256(), H._AutoV1(), H._AutoV3(100), H._Crc32()]
    if H.blake3_available():
        sinks.append(H._Blake3())
    lanes = H._lanes(sinks)
    assert sorted(len(lane) for lane in lanes) == [1] * (len(sinks) - 2) + [2]
    assert [type(s).__name__ for s in next(lane for lane in lanes if len(lane) == 2)] == ["_Crc32", "_AutoV1"]
    assert len(H._lanes([H._AutoV1()])) == 1 and len(H._lanes([H._Sha256()])) == 1
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom((1 << 20) * 3 + 12345))
    a = H.hash_file(p, threads=True, chunk_size=1 << 18)
    b = H.hash_file(p, threads=False, chunk_size=1 << 18)
    assert a.values() == b.values() and a.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert H.hash_file(p, ["crc32"], threads=True).crc32 == f"{zlib.crc32(p.read_bytes()) & 0xFFFFFFFF:08x}"


def test_hash_command_does_not_import_torch(tmp_path):
    """Issue 18: the whole-command hash time was mostly importing torch (hash_cache -> writer, the job -> dedup),
    then FastAPI (the parser imported ``serve``'s module from inside ``lib_sdtoolkit.server``: 8 s under load)."""
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    code = ("import sys, runpy\nsys.argv = ['lib_sdtoolkit', 'hash', '--algo', 'sha256', '--no-cache', '--json', "
            f"{str(f)!r}]\ntry:\n    runpy.run_module('lib_sdtoolkit', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('SERVER' if {'fastapi', 'lib_sdtoolkit.server'} & set(sys.modules) else "
            "'NO-SERVER')\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert hashlib.sha256(b"abc" * 1000).hexdigest() in out.stdout
    assert out.stdout.strip().splitlines()[-2:] == ["NO-SERVER", "NO-TORCH"]


@pytest.fixture()
def no_fast_crc(monkeypatch):
    """The optional ISA-L package made unimportable (as on a WebUI without it); the backend choice re-made."""
    from lib_sdtoolkit.files import hashes as H

    monkeypatch.setitem(sys.modules, "isal", None)
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    H.crc32_backend.cache_clear()
    yield H
    H.crc32_backend.cache_clear()


def _crc_files(tmp_path) -> list:
    """Sizes around the chunk and the 5 KiB GIL threshold, and a safetensors file (AutoV3 range)."""
    import random

    rnd = random.Random(17)
    out = []
    for n in (0, 1, 5 * 1024 + 1, (1 << 18) - 1, (1 << 18) * 3 + 4097):
        p = tmp_path / f"r{n}.bin"
        p.write_bytes(rnd.randbytes(n))
        out.append(p)
    return out


@pytest.mark.parametrize("fast", [True, False], ids=["isal", "zlib-fallback"])
def test_crc32_fast_path_and_fallback_match_zlib(tmp_path, fixture_files, request, fast):
    """Issue 17.3: CRC32 through ISA-L (the optional ``isal`` package, 4-5x zlib's speed here) where it imports,
    zlib otherwise; both give zlib's values, threaded or not, at chunk boundaries that are not 64-byte aligned."""
    from lib_sdtoolkit.files import hashes as H

    if fast:
        pytest.importorskip("isal.isal_zlib", reason="the optional isal package is not installed")
        H.crc32_backend.cache_clear()
        assert H.crc32_backend()[0] == "isal"
    else:
        request.getfixturevalue("no_fast_crc")
        assert H.crc32_backend() == ("zlib", zlib.crc32)
    for p in _crc_files(tmp_path) + [fixture_files["vae"]]:
        data = p.read_bytes()
        want = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
        for threads in (False, True):
            res = H.hash_file(p, ["crc32", "autov1"], threads=threads, chunk_size=(1 << 18) + 4093)
            assert res.crc32 == want, (p.name, threads)
    # the lane object itself, chained over uneven pieces
    data = (tmp_path / f"r{(1 << 18) * 3 + 4097}.bin").read_bytes()
    sink = H._Crc32()
    for a, b in ((0, 7), (7, 5000), (5000, 300_001), (300_001, len(data))):
        sink.update(memoryview(data)[a:b], a)
    assert sink.result() == f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    H.crc32_backend.cache_clear()


def test_all_five_without_the_fast_crc(no_fast_crc, blob, fixture_files):
    """The whole pass with zlib's CRC32 (the fast package absent): every value still equals the references."""
    for p in (blob, fixture_files["vae"]):
        res = no_fast_crc.hash_file(p, threads=True, chunk_size=1 << 20)
        ref = _independent(p)
        assert {a: getattr(res, a) for a in ref} == ref


def test_blake3_alone_uses_its_own_threads_and_matches(tmp_path):
    """BLAKE3 splits buffers over threads only when no sha256 lane is slower anyway; either way the reference
    value."""
    from lib_sdtoolkit.files import hashes as H

    p = tmp_path / "b.bin"
    p.write_bytes(os.urandom((1 << 20) * 2 + 333))
    ref = blake3.blake3(p.read_bytes()).hexdigest()
    alone = H._make_sinks(("blake3",), b"", 0)[0]
    assert alone.h.hexdigest() == blake3.blake3().hexdigest()  # a fresh state
    for algos in (["blake3"], ["blake3", "crc32"], ["sha256", "blake3"], None):
        assert H.hash_file(p, algos, threads=True, chunk_size=1 << 19).blake3 == ref, algos


def test_read_buffers_are_page_aligned():
    """The reads land in page-aligned buffers: the kernel's copy into a bytearray (data 16 bytes past a page
    boundary) cost 3x the CPU here."""
    import ctypes
    import mmap

    from lib_sdtoolkit.files import hashes as H

    b = H._aligned_buffer(1 << 20)
    c = (ctypes.c_char * len(b)).from_buffer(b)
    assert ctypes.addressof(c) % mmap.PAGESIZE == 0
    del c
    b.close()
    assert H.lane_plan(("sha256", "autov1", "autov3", "blake3", "crc32")) == [
        ("sha256",), ("autov3",), ("blake3",), ("crc32", "autov1")]
    assert H.lane_plan(("autov1",)) == [("autov1",)] and H.lane_plan(("sha256", "autov1")) == [("sha256",),
                                                                                               ("autov1",)]
