"""Issue 11: a bounded hypothesis fuzz target per reader, seeded from the checked-in malformed corpus.

Property for every target: the reader gives a valid result, or raises a ``SdToolkitError`` whose message names the
file. Any other exception (or a hang) fails. Budgets are small (``max_examples``) and derandomized, so the suite
stays fast and repeatable; ``deadline=None`` because the machine is shared (no timing is asserted).

Targets: the safetensors header parser (``open_model`` on safetensors bytes), the ckpt/pt loader (``open_model``
on pickles), the latent reader (``tiled_vae.vae.read_latent``) and the metadata parsers (safetensors
``__metadata__`` and non-tensor checkpoint fields).
"""
from __future__ import annotations

import io
import math
import struct
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # pinned in requirements-test.txt
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import make_malformed_corpus as mc  # noqa: E402

from lib_sdtoolkit.errors import SdToolkitError  # noqa: E402
from lib_sdtoolkit.files import open_model  # noqa: E402
from lib_sdtoolkit.files.reader import MAX_FIELD_CHARS  # noqa: E402

CORPUS = ROOT / "tests" / "corpus" / "malformed"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

_ST_SEEDS = sorted(p.name for p in CORPUS.iterdir() if p.suffix == ".safetensors")
_CKPT_SEEDS = sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".ckpt", ".pt"))


def _valid_st() -> bytes:
    return mc.st_tensor_file({"a.weight": ("F32", [2, 2], mc.f32(4)), "b": ("F16", [3], b"\x00\x3c" * 3),
                              "c": ("I64", [1], struct.pack("<q", 7))}, {"format": "pt", "note": "ok"})


def _valid_ckpt() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {"a.weight": torch.ones(2, 2), "b": torch.arange(3)}, "epoch": 2,
                "global_step": 10}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_model(path: Path) -> None:
    """The property for model readers: a usable reader (every tensor readable) or one clean error naming the file."""
    try:
        with open_model(path) as r:
            assert len(r) > 0
            for k in r.keys():
                t = r.get(k)
                info = r.info(k)
                assert tuple(t.shape) == info.shape and t.dtype == info.dtype
            for k, v in r.metadata.items():
                assert isinstance(k, str) and isinstance(v, str)
                assert len(v) <= MAX_FIELD_CHARS + 16
                v.encode("utf-8")  # printable on a UTF-8 console
    except SdToolkitError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        assert "\n" not in str(e)


@st.composite
def mutated(draw, seeds, base_valid) -> bytes:
    """A seed (a corpus file or a valid file) with a few byte changes, a cut or a splice."""
    name = draw(st.sampled_from(["<valid>"] + seeds))
    data = bytearray(base_valid() if name == "<valid>" else (CORPUS / name).read_bytes())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set8"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:pos]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:  # rewrite the 8-byte safetensors header length
            data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, len(data)))))
    return bytes(data)


# ------------------------------------------------------------------------------------------------ seeds first

@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir() if p.name != "README.md"))
def test_every_corpus_file_satisfies_the_property(name):
    check_model(CORPUS / name)


# ------------------------------------------------------------------------------------------------ safetensors

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                      st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), c, max_size=3)),
                        max_leaves=12)
dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "Q4"]), json_any)
shapes = st.one_of(st.lists(st.integers(-2, 6), max_size=4), json_any)
offsets = st.one_of(st.lists(st.integers(-8, 80), min_size=2, max_size=2), json_any)


@st.composite
def st_headers(draw) -> bytes:
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=8), json_any, max_size=4),
                                                json_any))
    for i in range(draw(st.integers(0, 4))):
        header[draw(st.text(min_size=1, max_size=8))] = draw(st.one_of(
            st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}), json_any))
    data = draw(st.binary(max_size=96))
    return mc.st_bytes(header, data)


@FUZZ
@given(data=st.one_of(mutated(_ST_SEEDS, _valid_st), st_headers()))
def test_fuzz_safetensors_header_parser(fdir, data):
    p = fdir / "fuzz.safetensors"
    p.write_bytes(data)
    check_model(p)


# ------------------------------------------------------------------------------------------------ ckpt / pt

@FUZZ
@given(data=mutated(_CKPT_SEEDS, _valid_ckpt), suffix=st.sampled_from([".ckpt", ".pt"]))
def test_fuzz_ckpt_loader(fdir, data, suffix):
    p = fdir / f"fuzz{suffix}"
    p.write_bytes(data)
    check_model(p)


# ------------------------------------------------------------------------------------------------ metadata

py_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12))
py_any = st.recursive(py_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.tuples(c, c),
                                                  st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), c,
                                                                  max_size=4)),
                      max_leaves=30)


@FUZZ
@given(fields=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "state_dict"), py_any,
                              max_size=4),
       meta=st.dictionaries(st.text(max_size=10), json_any, max_size=4))
def test_fuzz_metadata_parsers(fdir, fields, meta):
    """Non-tensor checkpoint fields and safetensors __metadata__ of any shape: strings out, bounded, or refused."""
    import torch

    p = fdir / "meta.ckpt"
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, **fields}, buf)
    p.write_bytes(buf.getvalue())
    check_model(p)
    with open_model(p) as r:  # a well-formed checkpoint: it must load, every field as a string
        assert set(r.metadata) == {str(k) for k in fields}
    q = fdir / "meta.safetensors"
    q.write_bytes(mc.st_bytes({"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                              mc.f32(1)))
    check_model(q)


# ------------------------------------------------------------------------------------------------ latents

@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=5), dtype=st.sampled_from(["F32", "F16", "I32", "BOOL"]),
       factor=st.one_of(st.none(), st.text(max_size=8), st.floats().map(repr)),
       scaled=st.one_of(st.none(), st.sampled_from(["true", "false", "False", ""]), st.text(max_size=4)),
       key=st.sampled_from(["latent", "latent", "x"]))
def test_fuzz_latent_reader(fdir, shape, dtype, factor, scaled, key):
    from lib_sdtoolkit.tiled_vae.vae import read_latent

    n = math.prod(shape)
    size = {"F32": 4, "F16": 2, "I32": 4, "BOOL": 1}[dtype]
    meta = {}
    if factor is not None:
        meta["sdtoolkit.scaling_factor"] = factor
    if scaled is not None:
        meta["sdtoolkit.latent_scaled"] = scaled
    p = fdir / "latent.safetensors"
    p.write_bytes(mc.st_tensor_file({key: (dtype, shape, b"\x00" * (n * size))}, meta or None))
    try:
        t, is_scaled, f = read_latent(str(p))
    except SdToolkitError as e:
        assert str(p) in str(e)
        return
    assert t.ndim == 4 and min(t.shape) >= 1 and t.dtype.is_floating_point
    assert isinstance(is_scaled, bool)
    assert f is None or (math.isfinite(f) and f > 0)
