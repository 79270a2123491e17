"""How many bytes a merge reads: with its inputs in the hash cache, each input once.

Measured with the kernel's own count of bytes this process read through read()/pread() (``rchar`` in
``/proc/self/io``; the engine reads with ``preadv`` and the hasher with ``readinto``, both counted). Linux only."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_sdtoolkit.files.hash_cache import HashCache
from lib_sdtoolkit.merge import MergeRecipe, merge_files, merge_in_memory

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")

#: what a merge may read besides its inputs: headers read a second time, the cache database, /proc itself
SLACK = 1 << 20


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _read_during(fn) -> int:
    before = _rchar()
    fn()
    return _rchar() - before


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_warm_hash_cache_merge_reads_each_input_once(fixture_files, tmp_path):
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    total = a.stat().st_size + b.stat().st_size
    cache = HashCache(tmp_path / "hashes.sqlite")
    recipe = MergeRecipe(str(a), str(b), alpha=0.3)
    ticks: list = []
    cold = _read_during(lambda: merge_files(recipe, tmp_path / "cold.safetensors", hash_cache=cache,
                                            hash_progress=lambda d, t, n: ticks.append((d, t, n))))
    # the hashing phase reported its own progress, in bytes, to the end
    assert ticks[0] == (0, total, "") and ticks[-1][:2] == (total, total)
    assert [d for d, _, _ in ticks] == sorted(d for d, _, _ in ticks)
    assert cache.get_hashes(a, ["sha256", "autov1"]).sha256 == _sha(a)

    warm_ticks: list = []
    rep = None

    def warm_merge():
        nonlocal rep
        rep = merge_files(recipe, tmp_path / "warm.safetensors", hash_cache=cache,
                          hash_progress=lambda d, t, n: warm_ticks.append(d))

    warm = _read_during(warm_merge)
    print(f"\ninputs {total} B; cold cache read {cold} B ({cold / total:.2f}x), warm {warm} B ({warm / total:.2f}x)")
    assert warm <= total * 1.1 + SLACK
    assert cold >= total * 1.9
    assert not warm_ticks  # nothing to hash
    # the same metadata either way: the hashes from the cache are the files' hashes
    assert rep.input_sha256 == {"A": _sha(a), "B": _sha(b)}
    cold_meta, warm_meta = _meta(tmp_path / "cold.safetensors"), _meta(tmp_path / "warm.safetensors")
    assert json.loads(cold_meta["sd_merge_models"]) == json.loads(warm_meta["sd_merge_models"])
    assert set(json.loads(warm_meta["sd_merge_models"])) == {_sha(a), _sha(b)}

    # in memory too
    mem = _read_during(lambda: merge_in_memory(recipe, hash_cache=cache))
    assert mem <= total * 1.1 + SLACK


def test_no_metadata_reads_once_and_hashes_nothing(fixture_files, tmp_path):
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    total = a.stat().st_size + b.stat().st_size
    cache = HashCache(tmp_path / "hashes.sqlite")
    ticks: list = []
    recipe = MergeRecipe(str(a), str(b), alpha=0.3, save_metadata=False)
    read = _read_during(lambda: merge_files(recipe, tmp_path / "n.safetensors", hash_cache=cache,
                                            hash_progress=lambda *t: ticks.append(t)))
    assert read <= total * 1.1 + SLACK
    assert not ticks
    # no input was hashed; the cache holds only the output's hashes, made while it was written
    assert cache.get_hashes(a) is None and cache.get_hashes(b) is None and len(cache) == 1
    assert cache.get_hashes(tmp_path / "n.safetensors", ["sha256", "autov1"]).sha256 == _sha(tmp_path / "n.safetensors")
    assert "sd_merge_models" not in _meta(tmp_path / "n.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_merge_command_records_the_output_hash_without_reading_the_output(fixture_files, tmp_path, monkeypatch,
                                                                            capsys, suffix):
    """The whole command (``merge``, recorded in the output folder's history): with the inputs in the hash cache,
    a .safetensors output's sha256 comes from the writer (no second read of the output) and is the file's; a
    .ckpt output, which the writer cannot hash, is read once more for it."""
    from lib_sdtoolkit import cli

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    total = a.stat().st_size + b.stat().st_size
    assert cli.main(["hash", str(a), str(b), "--algo", "sha256,autov1", "--json"]) == 0
    out = tmp_path / "out" / f"m{suffix}"
    out.parent.mkdir()
    capsys.readouterr()
    read = _read_during(lambda: cli.main(["merge", str(a), str(b), "-o", str(out), "--alpha", "0.3", "--json"]))
    capsys.readouterr()
    entry = json.loads((out.parent / "sdtoolkit-history.jsonl").read_text().splitlines()[-1])
    assert entry["sha256"] == _sha(out)
    size = out.stat().st_size
    print(f"\n{suffix}: inputs {total} B, output {size} B, read {read} B")
    if suffix == ".safetensors":
        assert read <= total * 1.1 + SLACK
        with HashCache(tmp_path / "cache") as cache:  # and a later merge of the output finds its hashes
            assert cache.get_hashes(out, ["sha256", "autov1"]).sha256 == entry["sha256"]
    else:
        assert read >= total + size * 0.9
