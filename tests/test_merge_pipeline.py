"""The streaming merge's pipeline (reader threads, compute workers, writer thread) and the writer's parts.

References are independent: safetensors' own ``load_file``/``save_file`` for the bytes, plain torch for the maths
(each tensor computed whole in float32 and cast with torch's own ``.to``)."""
from __future__ import annotations

import random
import threading

import pytest
import torch
from safetensors.torch import load_file

from lib_sdtoolkit.errors import InvalidInputError, ModelFileError, SdToolkitError
from lib_sdtoolkit.files import StreamingSafetensorsWriter
from lib_sdtoolkit.files.reader import SafetensorsReader
from lib_sdtoolkit.merge import MergeRecipe, merge_files
from lib_sdtoolkit.merge import engine as merge_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int64]


def _tensors():
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = (37, 11 + i)
        t = torch.randn(shape, generator=g) * 3
        out[f"t{i}"] = t.to(dt) if dt.is_floating_point else (t * 100).to(dt)
    out["empty"] = torch.zeros((0, 4), dtype=torch.float16)
    return out


def test_write_part_any_order_from_threads(tmp_path):
    """Parts of each tensor, shuffled and written from two threads, give the same file contents as writing each
    tensor whole (read back by the safetensors library)."""
    sd = _tensors()
    out = tmp_path / "parts.safetensors"
    jobs = []
    for k, t in sd.items():
        flat = t.reshape(-1)
        for s in range(0, max(flat.numel(), 1), 50):
            jobs.append((k, s, flat[s:s + 50].clone()))
    random.Random(3).shuffle(jobs)
    with StreamingSafetensorsWriter(out, [(k, t.dtype, t.shape) for k, t in sd.items()]) as w:
        threads = [threading.Thread(target=lambda js: [w.write_part(*j) for j in js], args=(jobs[i::2],))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not w.missing
    got = load_file(str(out))
    assert list(got) == list(sd)
    for k, t in sd.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k


def test_write_part_refuses_overlap_excess_and_missing(tmp_path):
    t = torch.arange(100, dtype=torch.float16)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(InvalidInputError, match="written twice"):
        with StreamingSafetensorsWriter(out, [("x", torch.float16, (100,))]) as w:
            w.write_part("x", 0, t[:60])
            w.write_part("x", 50, t[50:])  # 110 elements of a 100-element tensor
    with pytest.raises(InvalidInputError, match="does not fit"):
        with StreamingSafetensorsWriter(out, [("x", torch.float16, (100,))]) as w:
            w.write_part("x", 90, t[:20])
    with pytest.raises(InvalidInputError, match="does not fit"):
        with StreamingSafetensorsWriter(out, [("x", torch.float16, (100,))]) as w:
            w.write_part("x", 0, t.float())
    with pytest.raises(InvalidInputError, match="never written"):
        with StreamingSafetensorsWriter(out, [("x", torch.float16, (100,))]) as w:
            w.write_part("x", 0, t[:99])
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def _ref(a: dict, b: dict, fn, out_dtype) -> dict:
    res = {}
    for k, x in a.items():
        if not x.is_floating_point() or k.endswith("position_ids"):
            res[k] = x
        else:
            res[k] = fn(x.float(), b[k].float()).to(out_dtype)
    return res


@pytest.mark.parametrize("out_dtype", ["fp16", "bf16", "fp32", "fp8_e4m3fn"])
def test_pieces_and_chunks_are_bit_identical_to_whole_tensors(fixture_files, tmp_path, monkeypatch, out_dtype):
    """Chunks (read/write unit) and pieces (compute unit) made tiny and odd-sized, so that every tensor is split
    at places that are not multiples of a vector width: the output equals torch's whole-tensor computation."""
    monkeypatch.setattr(merge_engine, "SMALL_ELEMENTS", 3000)
    monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 4099)
    monkeypatch.setattr(merge_engine, "PIECE_ELEMENTS", 997)
    monkeypatch.setattr(merge_engine, "PIECE_ELEMENTS_ALONE", 997)
    monkeypatch.setattr(merge_engine, "READ_AHEAD", 1)
    monkeypatch.setattr(merge_engine, "READ_LANES", 3)  # parts of one input read out of order
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    out = tmp_path / "o.safetensors"
    merge_files(MergeRecipe(str(a), str(b), alpha=0.3, dtype=out_dtype, save_metadata=False), out, workers=2)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp8_e4m3fn": torch.float8_e4m3fn}[out_dtype]
    ref = _ref(load_file(str(a)), load_file(str(b)), lambda x, y: x.mul_(1.0 - 0.3).add_(y.mul_(0.3)), dt)
    got = load_file(str(out))
    assert list(got) == list(ref)
    big = 0
    for k, r in ref.items():
        assert got[k].dtype == r.dtype and torch.equal(got[k].view(torch.uint8), r.view(torch.uint8)), k
        big += r.numel() > 4099
    assert big  # some tensors really were split into several chunks


def _threads() -> set:
    return {t.name for t in threading.enumerate() if t.name.startswith("sdtoolkit-merge")}


def test_a_read_error_in_the_pipeline_stops_it_and_leaves_nothing(fixture_files, tmp_path, monkeypatch):
    """A reader thread's error reaches the caller as itself; no output, no temporary file, no thread left."""
    calls = {"n": 0, "fail_at": None}
    real = SafetensorsReader._pread  # under read_into and read_span_into (a batch of small tensors)

    def flaky(self, buf, pos, key):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise ModelFileError("unexpected end of file while reading the tensor (truncated?)", self.path, key)
        return real(self, buf, pos, key)

    monkeypatch.setattr(SafetensorsReader, "_pread", flaky)
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    out = tmp_path / "o.safetensors"
    merge_files(MergeRecipe(str(a), str(b), save_metadata=False), tmp_path / "counted.safetensors")
    (tmp_path / "counted.safetensors").unlink()
    assert calls["n"] >= 4
    calls.update(n=0, fail_at=calls["n"] // 2)  # half-way through the reads
    with pytest.raises(ModelFileError, match="unexpected end of file"):
        merge_files(MergeRecipe(str(a), str(b), save_metadata=False), out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert not _threads()


def test_cancel_stops_the_pipeline_and_leaves_nothing(fixture_files, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(done, total, key):
        seen.append(done)
        if done >= 5:
            cancel.set()

    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    out = tmp_path / "o.safetensors"
    with pytest.raises(SdToolkitError, match="cancelled"):
        merge_files(MergeRecipe(str(a), str(b), save_metadata=False), out, progress=progress, cancel=cancel)
    assert max(seen) >= 5 and not out.exists() and not list(tmp_path.iterdir())
    assert not _threads()


# ---------------------------------------------------------------------------------------------------------------
# the output's digest, hashed by the writer as it writes (in file order, whatever order the parts come in)

def _file_sha(p) -> str:
    import hashlib

    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _file_autov1(p) -> str:
    import hashlib

    with open(p, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def test_writer_digest_of_parts_in_any_order_is_the_files_sha256(tmp_path):
    """Parts shuffled and written from two threads, some held by the lane until the bytes before them come: the
    digest equals hashlib's of the file on disk, and every part's buffer is released exactly once."""
    sd = _tensors()
    sd["big"] = torch.randn(700, 900).to(torch.bfloat16)  # past AutoV1's window at 1 MiB
    out = tmp_path / "parts.safetensors"
    jobs = []
    for k, t in sd.items():
        flat = t.reshape(-1)
        for s in range(0, max(flat.numel(), 1), 5000 if k == "big" else 50):
            jobs.append((k, s, flat[s:s + (5000 if k == "big" else 50)].clone()))
    random.Random(5).shuffle(jobs)
    released = []
    lock = threading.Lock()

    def rel(i):
        with lock:
            released.append(i)

    with StreamingSafetensorsWriter(out, [(k, t.dtype, t.shape) for k, t in sd.items()], {"m": "x" * 333},
                                    digest=True) as w:
        threads = [threading.Thread(target=lambda js: [w.write_part(*j, release=lambda i=i: rel(i)) for i, j in js],
                                    args=(list(enumerate(jobs))[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(released) == list(range(len(jobs)))
    assert out.stat().st_size > 0x110000
    assert w.digests == {"sha256": _file_sha(out), "autov1": _file_autov1(out)}
    assert load_file(str(out))["big"].equal(sd["big"])


def test_writer_digest_is_none_when_a_part_fails(tmp_path):
    """A write that raises leaves no file and no digest (and its lane thread ends)."""
    out = tmp_path / "x.safetensors"
    with pytest.raises(InvalidInputError):
        with StreamingSafetensorsWriter(out, [("a", torch.float16, (4,))], digest=True) as w:
            w.write_part("a", 0, torch.zeros(2, dtype=torch.float16))
            w.write_part("a", 0, torch.zeros(4, dtype=torch.float16))  # more than the tensor has
    assert w.digests is None and not out.exists()
    assert not [t for t in threading.enumerate() if t.name == "sdtoolkit-write-digest"]


@pytest.mark.parametrize("case", [
    dict(a="sd1_fp16", b="sd1_bf16", dtype="fp16", meta=True),
    dict(a="sd1_fp16", b="sd1_bf16", dtype="fp8_e4m3fn", meta=True),
    dict(a="sd1", b="sd1_fp16", dtype="fp32", meta=False, method="add_difference", c="sd1_bf16"),
    dict(a="sd1_fp16", b="sd1_bf16", dtype="bf16", meta=False, method="ties", beta=0.5),  # whole tensors
])
def test_merge_output_sha256_is_the_files_and_goes_into_the_hash_cache(fixture_files, tmp_path, monkeypatch, case):
    """The merge's own output digest (made while writing, with chunks small and out of order) equals hashlib's
    sha256 of the file; the hash cache holds it and AutoV1 for the file as it is, so a later merge that takes the
    output as an input hashes nothing."""
    from lib_sdtoolkit.files.hash_cache import HashCache

    monkeypatch.setattr(merge_engine, "SMALL_ELEMENTS", 30000)
    monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 40961)
    cache = HashCache(tmp_path / "h.sqlite")
    a, b = fixture_files[case["a"]], fixture_files[case["b"]]
    c = fixture_files[case["c"]] if "c" in case else None
    out = tmp_path / "o.safetensors"
    recipe = MergeRecipe(str(a), str(b), str(c) if c else None, alpha=0.3, beta=case.get("beta"),
                         method=case.get("method", "weighted_sum"), dtype=case["dtype"], save_metadata=case["meta"])
    rep = merge_files(recipe, out, workers=2, hash_cache=cache)
    assert rep.output_sha256 == _file_sha(out)
    hit = cache.get_hashes(out, ["sha256", "autov1"])
    assert hit is not None and (hit.sha256, hit.autov1) == (_file_sha(out), _file_autov1(out))
    ticks = []
    merge_files(MergeRecipe(str(out), str(b), alpha=0.5), tmp_path / "o2.safetensors", hash_cache=cache,
                hash_progress=lambda *x: ticks.append(x))
    assert not [t for t in ticks if t[2] == out.name]  # the output's hashes came from the cache


def test_ckpt_output_has_no_writer_digest(fixture_files, tmp_path):
    a, b = fixture_files["sd1_fp16"], fixture_files["sd1_bf16"]
    rep = merge_files(MergeRecipe(str(a), str(b), save_metadata=False), tmp_path / "o.ckpt", hash_cache=False)
    assert rep.output_sha256 is None


def test_a_worker_runs_torch_ops_alone_and_no_other_thread_changes():
    """The merge workers' one-thread setting is their own: the calling thread and a thread started after keep
    torch's count (the WebUI's threads go on generating with theirs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # this file runs with one thread; the point is a count other than the worker's
    try:
        _check_worker_alone(2)
    finally:
        torch.set_num_threads(saved)


def _check_worker_alone(before: int) -> None:
    seen = {}

    def worker():
        seen["done"] = merge_engine._ops_in_this_thread()
        seen["worker"] = torch.get_num_threads()

    def other():
        seen["other"] = torch.get_num_threads()

    for fn in (worker, other):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    if not seen["done"]:
        pytest.skip("no libgomp in this process (torch built with another OpenMP runtime)")
    assert seen["worker"] == 1
    assert torch.get_num_threads() == before and seen["other"] == before


def test_write_span_writes_neighbours_in_one_write_and_refuses_the_rest(tmp_path):
    """A span is the bytes of tensors next to each other in the planned layout, one after the other: read back by
    the safetensors library they are the tensors; tensors not next to each other, a wrong byte count, a non-uint8
    buffer and a tensor written twice are refused."""
    sd = _tensors()
    names = list(sd)
    specs = [(k, t.dtype, t.shape) for k, t in sd.items()]
    out = tmp_path / "span.safetensors"

    def raw(*keys):
        return torch.cat([sd[k].contiguous().reshape(-1).view(torch.uint8) for k in keys])

    with StreamingSafetensorsWriter(out, specs) as w:
        w.write_span(names[:3], raw(*names[:3]))
        w.write_span(names[3:], raw(*names[3:]))
    got = load_file(str(out))
    for k, t in sd.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k
    bad = tmp_path / "bad.safetensors"
    for span, data, msg in (([names[0], names[2]], raw(names[0], names[2]), "not next to each other"),
                            (names[:2], raw(*names[:2])[:-1], "bytes"),
                            (names[:2], raw(*names[:2]).view(torch.float16)
                             if raw(*names[:2]).numel() % 2 == 0 else raw(*names[:2]).float(), "bytes")):
        with pytest.raises(InvalidInputError, match=msg):
            with StreamingSafetensorsWriter(bad, specs) as w:
                w.write_span(span, data)
    with pytest.raises(InvalidInputError, match="written twice"):
        with StreamingSafetensorsWriter(bad, specs) as w:
            w.write(names[1], sd[names[1]])
            w.write_span(names[:2], raw(*names[:2]))
    assert not bad.exists() and not list(tmp_path.glob("*.tmp"))
