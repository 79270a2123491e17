"""Model-file I/O: lazy reading, bad input, atomic streaming writes (checked against the safetensors library)."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import sys
import threading
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_sdtoolkit import cli
from lib_sdtoolkit.errors import (FileNotFound, InvalidInputError, ModelFileError, OutputExistsError, SdToolkitError,
                                  UnsafeFileError)
from lib_sdtoolkit.files import (StreamingSafetensorsWriter, check_output_path, load_state_dict, open_model, save_ckpt,
                                 save_safetensors, save_state_dict)


def _sd():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(5, 3, generator=g),
        "w16": torch.randn(4, 4, generator=g).half(),
        "wbf": torch.randn(7, generator=g).to(torch.bfloat16),
        "pos": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_safetensors_roundtrip_against_library(tmp_path):
    sd = _sd()
    out = save_safetensors(tmp_path / "m.safetensors", sd, {"note": "hi"})
    ref = load_file(str(out))  # the independent reader
    assert set(ref) == set(sd) and all(_equal(ref[k], sd[k]) for k in sd)
    with open_model(out) as r:
        assert r.format == "safetensors" and r.metadata == {"note": "hi"}
        assert [r.info(k).shape for k in sd] == [tuple(v.shape) for v in sd.values()]
        assert r.info("w16").dtype == torch.float16 and r.info("w16").nbytes == 32
        assert all(_equal(r.get(k), sd[k]) for k in sd)


def test_reads_files_written_by_the_library(tmp_path):
    sd = _sd()
    del sd["empty"]
    save_file(sd, str(tmp_path / "lib.safetensors"), metadata={"a": "b"})
    with open_model(tmp_path / "lib.safetensors") as r:
        assert r.metadata == {"a": "b"}
        assert all(_equal(r.get(k), sd[k]) for k in sd)
        offsets = [r.info(k).offset for k in r.keys()]
        assert offsets == sorted(offsets), "keys come in file order"


def test_ckpt_state_dict_nesting_and_metadata(tmp_path):
    sd = _sd()
    torch.save({"state_dict": sd, "epoch": 6, "global_step": 470000, "note": "x"}, tmp_path / "m.ckpt")
    with open_model(tmp_path / "m.ckpt") as r:
        assert r.format == "ckpt"
        assert set(r.keys()) == set(sd)
        assert r.metadata["epoch"] == "6" and r.metadata["global_step"] == "470000"
        assert all(_equal(r.get(k), sd[k]) for k in sd)
    # a bare dict (.pt VAE files) and the legacy non-zip format
    torch.save(sd, tmp_path / "bare.pt", _use_new_zipfile_serialization=False)
    got = load_state_dict(tmp_path / "bare.pt")
    assert all(_equal(got[k], sd[k]) for k in sd)


def test_lightning_callback_in_real_sd_checkpoints_is_tolerated(tmp_path):
    # Real SD1.x ckpts pickle a pytorch_lightning ModelCheckpoint callback; build such a pickle with a
    # stand-in module of that name, then remove it so loading cannot import anything.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # noqa: D401 - a plain data object like the real one
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        sys.modules[n] = mod
    try:
        torch.save({"state_dict": {"a": torch.ones(2)}, "callbacks": {"cb": ModelCheckpoint()}}, tmp_path / "pl.ckpt")
    finally:
        for n in names:
            del sys.modules[n]
    with open_model(tmp_path / "pl.ckpt") as r:
        assert r.keys() == ["a"]
        assert "callbacks" in r.metadata


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "x": _Evil()}, p)
    with pytest.raises(UnsafeFileError) as e:
        open_model(p)
    assert str(p) in str(e.value) and "run code" in str(e.value)
    # legacy pickle too
    p2 = tmp_path / "evil.pt"
    with open(p2, "wb") as fh:
        pickle.dump({"a": _Evil()}, fh, protocol=2)
    with pytest.raises(ModelFileError):
        open_model(p2)


@pytest.mark.parametrize("case", ["missing", "directory", "text", "empty", "truncated_header", "truncated_data",
                                  "lying_offsets", "lying_shape", "bad_json", "overlap", "bad_dtype", "no_tensors",
                                  "truncated_zip"])
def test_bad_input_names_the_file_and_the_problem(tmp_path, case, capsys):
    p = tmp_path / f"{case}.safetensors"
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.ones(2)}, str(good))
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])

    def with_header(h):
        hb = json.dumps(h).encode()
        return struct.pack("<Q", len(hb)) + hb + raw[8 + n:]

    expect = "safetensors"
    if case == "missing":
        expect = "no such file"
    elif case == "directory":
        p.mkdir()
        expect = "directory"
    elif case == "text":
        p.write_text("hello, I am not a model at all\n" * 10)
        expect = "not a"
    elif case == "empty":
        p.write_bytes(b"")
        expect = "empty"
    elif case == "truncated_header":
        p.write_bytes(raw[:8 + n // 2])
        expect = "truncated"
    elif case == "truncated_data":
        p.write_bytes(raw[:-10])
        expect = "truncated"
    elif case == "lying_offsets":
        header["a"]["data_offsets"] = [0, 10_000]
        p.write_bytes(with_header(header))
        expect = "lies"
    elif case == "lying_shape":
        header["a"]["shape"] = [8, 8]
        p.write_bytes(with_header(header))
        expect = "lies"
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 20)
        expect = "not JSON"
    elif case == "overlap":
        header["b"]["data_offsets"] = [0, 8]
        p.write_bytes(with_header(header))
        expect = "overlap"
    elif case == "bad_dtype":
        header["a"]["dtype"] = "Q7"
        p.write_bytes(with_header(header))
        expect = "unknown dtype"
    elif case == "no_tensors":
        save_file({}, str(p))
        expect = "no tensors"
    elif case == "truncated_zip":
        p = tmp_path / "t.ckpt"
        buf = io.BytesIO()
        torch.save({"state_dict": {"a": torch.ones(1000)}}, buf)
        p.write_bytes(buf.getvalue()[:-200])
        expect = ""
    with pytest.raises(SdToolkitError) as e:
        open_model(p)
    msg = str(e.value)
    assert str(p) in msg and expect.lower() in msg.lower()
    if case == "missing":
        assert isinstance(e.value, FileNotFound)
    # the CLI says the same in one line and exits 2
    assert cli.main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(p) in err[0]


def test_streaming_writer_any_order_and_threads(tmp_path):
    sd = {f"t{i}": torch.randn(64, i + 1) for i in range(40)}
    specs = [(k, v.dtype, v.shape) for k, v in sd.items()]
    out = tmp_path / "s.safetensors"
    with StreamingSafetensorsWriter(out, specs, {"k": "v"}) as w:
        assert not out.exists(), "nothing appears before the rename"
        keys = list(sd)[::-1]
        threads = [threading.Thread(target=lambda ks=keys[i::4]: [w.write(k, sd[k]) for k in ks]) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ref = load_file(str(out))
    assert all(_equal(ref[k], sd[k]) for k in sd)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_writer_refuses_and_cleans_up(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [("a", torch.float16, (2,)), ("b", torch.float32, (3,))]
    # wrong dtype / shape / unknown name
    with pytest.raises(InvalidInputError):
        with StreamingSafetensorsWriter(out, specs) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(InvalidInputError):
        with StreamingSafetensorsWriter(out, specs) as w:
            w.write("zzz", torch.zeros(2))
    # a tensor never written
    with pytest.raises(InvalidInputError, match="never written"):
        with StreamingSafetensorsWriter(out, specs) as w:
            w.write("a", torch.zeros(2, dtype=torch.float16))
    # an exception in the caller's loop
    with pytest.raises(KeyError):
        with StreamingSafetensorsWriter(out, specs) as w:
            w.write("a", torch.zeros(2, dtype=torch.float16))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == [], "no partial output, no temp file left"
    # metadata must be strings
    with pytest.raises(InvalidInputError, match="strings"):
        StreamingSafetensorsWriter(out, specs, {"n": 3})


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "full.safetensors"
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ModelFileError, match="disk full"):
        save_safetensors(out, {f"k{i}": torch.ones(10) for i in range(5)})
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_overwrite(tmp_path):
    a = tmp_path / "a.safetensors"
    save_safetensors(a, {"x": torch.ones(1)})
    before = a.read_bytes()
    with pytest.raises(OutputExistsError):
        save_safetensors(a, {"x": torch.zeros(1)})
    with pytest.raises(OutputExistsError, match="one of the inputs"):
        check_output_path(a, [a], overwrite=True)
    with pytest.raises(OutputExistsError, match="one of the inputs"):
        check_output_path(tmp_path / "." / "a.safetensors", [a], overwrite=True)
    assert a.read_bytes() == before
    save_safetensors(a, {"x": torch.zeros(1)}, overwrite=True)
    assert torch.equal(load_file(str(a))["x"], torch.zeros(1))
    # the ckpt writer
    c = save_state_dict(tmp_path / "c.ckpt", {"x": torch.ones(2)})
    assert torch.equal(torch.load(c, weights_only=True)["state_dict"]["x"], torch.ones(2))
    with pytest.raises(OutputExistsError):
        save_ckpt(c, {"x": torch.ones(2)})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("no_preadv", [False, True])
def test_ranged_reads_into_buffers(tmp_path, suffix, no_preadv, monkeypatch):
    """``read_elements`` / ``read_into`` give exactly the stored elements of any range (checked against the
    safetensors library / torch.load), in both readers, threads at once, and without ``os.preadv`` (Windows)."""
    from lib_sdtoolkit.files import reader as reader_mod

    if no_preadv:
        if suffix == ".ckpt":
            pytest.skip("the checkpoint reader does not read the file")
        monkeypatch.setattr(reader_mod, "_PREADV", None)
    sd = _sd()
    g = torch.Generator().manual_seed(1)
    sd["big"] = torch.randn(301, 7, generator=g).half()
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
        ref = load_file(str(path))
    else:
        torch.save({"state_dict": sd}, path)
        ref = torch.load(path, weights_only=True)["state_dict"]
    with open_model(path) as r:
        assert r.ranged_reads == (suffix == ".safetensors")
        for k, t in ref.items():
            whole = r.read_elements(k)
            assert whole.dtype == t.dtype and torch.equal(whole, t.reshape(-1))
        flat = ref["big"].reshape(-1)
        for start, count in ((0, 1), (5, 700), (2100, 7), (2107, 0)):
            assert torch.equal(r.read_elements("big", start, count), flat[start:start + count])
        out = torch.full((13,), 7.0, dtype=torch.float16)
        assert r.read_into("big", out, 99) is out and torch.equal(out, flat[99:112])
        errors = []

        def worker(i):
            for s in range(i, 2000, 97):
                if not torch.equal(r.read_elements("big", s, 50), flat[s:s + 50]):
                    errors.append(s)
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        with pytest.raises(ValueError, match="outside"):
            r.read_elements("big", 2100, 8)
        with pytest.raises(ValueError, match="contiguous CPU"):
            r.read_into("big", torch.empty(3, dtype=torch.float32))
        with pytest.raises(ModelFileError, match="no such tensor"):
            r.read_elements("nope")


def test_ranged_read_of_a_file_cut_short(tmp_path):
    sd = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(1000, dtype=torch.float32)}
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    with open_model(path) as r:
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size - 100)  # cut after the header was read
        assert torch.equal(r.read_elements("a"), sd["a"])
        with pytest.raises(ModelFileError, match="truncated"):
            r.read_elements("b")


def test_header_cache_follows_the_bytes_not_the_file(tmp_path):
    """Headers are cached by their bytes: a file changed in place to the same size (a lying header, then another
    dtype) is parsed again at once, whatever its timestamps say, and what a reader hands out is its own."""
    from lib_sdtoolkit.files import reader as R

    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}, str(p),
              {"k": "v"})
    st = os.stat(p)
    with open_model(p) as r:
        assert r.info("a").dtype == torch.float16
        r.metadata["k"] = "changed by a caller"
        r._infos.pop("b")
    raw = p.read_bytes()
    with open_model(p) as r:  # from the cache, untouched by the first reader's changes
        assert r.metadata == {"k": "v"} and set(r.keys()) == {"a", "b"}
    assert any(k[0] == st.st_size for k in R._HEADERS)
    # same size, same timestamps, another header: the shape of "a" now claims more bytes than it has
    lying = raw.replace(b'"shape":[4]', b'"shape":[5]', 1)
    assert len(lying) == len(raw) and lying != raw
    p.write_bytes(lying)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelFileError, match="header lies"):
        open_model(p)
    # and a valid change of dtype of the same size is seen
    retyped = raw.replace(b'{"dtype":"F16","shape":[4]', b'{"dtype":"I16","shape":[4]', 1)
    assert len(retyped) == len(raw) and retyped != raw
    p.write_bytes(retyped)
    with open_model(p) as r:
        assert r.info("a").dtype == torch.int16 and r.info("b").dtype == torch.float16
