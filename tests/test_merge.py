"""Checkpoint merge: every method, block weights, presets and option against an independent plain-torch
computation from the published formulas, on fixture checkpoints with the real SD1 / SD2 / SDXL key layouts.

The reference code below never calls the merge engine: it loads the files with safetensors/torch, assigns blocks
with its own regexes (the rule bbc-mc MBW / supermerger document) and applies the formulas in float32."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_sdtoolkit.errors import ArchitectureError, InvalidInputError, ModelFileError, OutputExistsError
from lib_sdtoolkit.merge import MergeRecipe, merge_files, merge_in_memory
from lib_sdtoolkit.merge import engine as merge_engine
from lib_sdtoolkit.merge.presets import PRESETS

POS = "embeddings.position_ids"


# ---------------------------------------------------------------------------------------------- fixtures
def _derive(sd: Dict[str, torch.Tensor], seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """A different model with the same keys: A + N(0, 0.02), stored as ``dtype`` (ints unchanged)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = (v.float() + torch.randn(v.shape, generator=g) * 0.02).to(dtype)
        else:
            out[k] = v.clone()
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{arch: {"A","B","C": Path}}: A fp16, B fp32, C bf16 (the maths must not care)."""
    from lib_sdtoolkit.samples import factory

    root = tmp_path_factory.mktemp("merge_models")
    out = {}
    for arch in ("SD1", "SD2", "SDXL", "SDXL-refiner"):
        a = factory.build_state_dict(arch, seed=0, dtype=torch.float16)
        paths = {"A": root / f"{arch}_A.safetensors", "B": root / f"{arch}_B.safetensors",
                 "C": root / f"{arch}_C.safetensors"}
        save_file(a, str(paths["A"]))
        save_file(_derive(a, 1, torch.float32), str(paths["B"]))
        save_file(_derive(a, 2, torch.bfloat16), str(paths["C"]))
        out[arch] = paths
    return out


_CACHE: Dict[str, Dict[str, torch.Tensor]] = {}


def _load(p) -> Dict[str, torch.Tensor]:
    """Load a file (inputs are cached: they are read-only for the whole session; callers must not mutate)."""
    p = Path(p)
    if "merge_models" in str(p.parent):
        if str(p) not in _CACHE:
            _CACHE[str(p)] = _read(p)
        return _CACHE[str(p)]
    return _read(p)


def _read(p: Path) -> Dict[str, torch.Tensor]:
    if p.suffix == ".safetensors":
        return load_file(str(p))
    obj = torch.load(str(p), weights_only=True)
    return obj.get("state_dict", obj)


# ---------------------------------------------------------------------------------------------- reference
_COUNTS = {"SD1": 12, "SD2": 12, "SDXL": 9, "SDXL-refiner": 12}   # input (= output) blocks of the real UNets


def ref_block(key: str, arch: str) -> str:
    """The documented MBW rule, written independently of lib_sdtoolkit.arch."""
    if not key.startswith("model.diffusion_model."):
        return "BASE"
    rest = key[len("model.diffusion_model."):]
    n = _COUNTS[arch]
    if rest.startswith("time_embed.") or rest.startswith("label_emb."):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{n - 1:02d}"
    m = re.match(r"input_blocks\.(\d+)\.", rest)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    m = re.match(r"output_blocks\.(\d+)\.", rest)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def ref_names(arch: str):
    n = _COUNTS[arch]
    return ["BASE"] + [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]


def ref_formula(method, a, b, c, al, be):
    a, b = a.float(), b.float()
    c = c.float() if c is not None else None
    if method == "weighted_sum":
        return a * (1 - al) + b * al
    if method == "add_difference":
        return a + (b - c) * al
    if method == "sum_twice":
        return (a * (1 - al) + b * al) * (1 - be) + c * be
    if method == "triple_sum":
        return a * (1 - al - be) + b * al + c * be
    raise AssertionError(method)


def ref_merge(method, A, B, C, arch, alpha, beta=0.0, out_dtype=torch.float16):
    """alpha/beta: a float or a {block: ratio} dict."""
    out = {}
    for k, a in A.items():
        if k.endswith(POS) or not a.is_floating_point():
            out[k] = a
            continue
        blk = ref_block(k, arch)
        al = alpha[blk] if isinstance(alpha, dict) else alpha
        be = beta[blk] if isinstance(beta, dict) else beta
        out[k] = ref_formula(method, a, B[k], C[k] if C is not None else None, al, be).to(out_dtype)
    return out


def assert_same(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]):
    assert list(out) == list(ref) or set(out) == set(ref)
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == r.dtype, k
        assert o.shape == r.shape, k
        assert torch.equal(o, r), f"{k}: max diff {(o.double() - r.double()).abs().max().item()}"


# ---------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("arch", ["SD1", "SD2", "SDXL"])
@pytest.mark.parametrize("method", ["weighted_sum", "add_difference", "sum_twice", "triple_sum"])
def test_methods_match_the_formulas(models, tmp_path, arch, method):
    m = models[arch]
    three = method != "weighted_sum"
    recipe = MergeRecipe(str(m["A"]), str(m["B"]), str(m["C"]) if three else None, method=method, alpha=0.3,
                         beta=0.25 if method in ("sum_twice", "triple_sum") else None)
    out = tmp_path / "out.safetensors"
    rep = merge_files(recipe, out)
    A, B = _load(m["A"]), _load(m["B"])
    C = _load(m["C"]) if three else None
    beta = 0.25 if method in ("sum_twice", "triple_sum") else 0.0
    got = _load(out)
    assert_same(got, ref_merge(method, A, B, C, arch, 0.3, beta))
    assert rep.architecture == arch and rep.keys_total == len(A)
    # file order of A is kept in the output
    with open(out, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__")
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert order == list(_load(m["A"]))


def test_small_tensors_in_batches_equal_the_formula_whatever_breaks_a_batch(models, tmp_path, monkeypatch):
    """Small tensors next to each other go through the pipeline as one batch: one read per input where they lie
    together in its file (tensor by tensor where not), flat runs across tensors of one block and dtypes, one write.
    The file equals the formula tensor by tensor whatever splits a batch or a run: another block's ratio, an fp32
    tensor among fp16 ones, an input holding them in another order, tensors only A has (copied), an int64 tensor
    right after an odd number of fp16 bytes."""
    from lib_sdtoolkit.files import open_model, save_safetensors

    with open_model(models["SD1"]["A"]) as r:
        a_sd = {k: r.get(k) for k in r.keys()}
    B = _load(models["SD1"]["B"])
    # first, tensors only A has: 8 + 6 bytes of fp16, so that the int64 after them would sit 14 bytes into a batch
    A2: Dict[str, torch.Tensor] = {"extra.e1": torch.arange(4, dtype=torch.float16),
                                   "extra.e2": torch.arange(3, dtype=torch.float16),
                                   "extra.int64": torch.arange(5, dtype=torch.int64),
                                   "extra.e3": torch.arange(2, dtype=torch.float16)}
    for i, (k, t) in enumerate(a_sd.items()):
        A2[k] = t.float() if t.is_floating_point() and i % 5 == 0 and t.numel() < 5000 else t
    a2, b2 = tmp_path / "a2.safetensors", tmp_path / "b2.safetensors"
    save_safetensors(a2, A2)
    save_safetensors(b2, dict(reversed(list(B.items()))))  # B's file holds them in the other order
    seen = []
    real = merge_engine._batched
    monkeypatch.setattr(merge_engine, "_batched", lambda segs: seen.append(real(segs)) or seen[-1])
    vals = [round(0.03 * i + 0.01, 4) for i in range(25)]
    out = tmp_path / "o.safetensors"
    merge_files(MergeRecipe(str(a2), str(b2), blocks=[0.9] + vals, save_metadata=False), out, workers=2)
    ratios = dict(zip(ref_names("SD1"), [0.9] + vals))
    ref = {}
    for k, a in A2.items():
        if k not in B or k.endswith(POS) or not a.is_floating_point():
            ref[k] = a.to(torch.float16) if k not in B and a.is_floating_point() else a
        else:
            ref[k] = ref_formula("weighted_sum", a, B[k], None, ratios[ref_block(k, "SD1")], 0).to(torch.float16)
    got = load_file(str(out))
    assert list(got) == list(A2)
    assert_same(got, ref)
    # the cases above really happened: batches, read whole from A and tensor by tensor from B, runs over several
    # tensors, batches of several runs, and a batch that ends before the int64 tensor
    batches = [sg for sg in seen[0] if sg.kind == "batch"]
    assert len(batches) >= 3
    two = [sg for sg in batches if len(sg.members[0].srcs) == 2]
    assert any(sg.spans[0] for sg in two) and not any(sg.spans[1] for sg in two)
    assert any(end - first > 1 for sg in batches for first, end, _ in sg.runs)
    assert any(len(sg.runs) > 1 for sg in batches)
    assert [m.item.name for m in batches[0].members] == ["extra.e1", "extra.e2"]
    assert [m.item.name for m in batches[1].members] == ["extra.int64", "extra.e3"]


def test_output_dtypes_and_fp32_maths(models, tmp_path):
    m = models["SD1"]
    A, B = _load(m["A"]), _load(m["B"])
    for dt, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / f"o_{dt}.safetensors"
        merge_files(MergeRecipe(str(m["A"]), str(m["B"]), alpha=0.7, dtype=dt), out)
        assert_same(_load(out), ref_merge("weighted_sum", A, B, None, "SD1", 0.7, out_dtype=tdt))
    # alpha = 0 returns A exactly (cast once, no double rounding)
    out = tmp_path / "zero.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), alpha=0.0), out)
    assert_same(_load(out), A)


def test_chunked_streaming_matches(models, tmp_path, monkeypatch):
    """Large tensors are computed chunk by chunk; force tiny chunks and compare with the formula.

    5000 / 3331 (not 1000 / 777: 11,000 chunks, 5x the time of the whole merge) still sends 219 of the tiny SD2's
    tensors through the chunk path, most in several chunks with a short last one at an offset that is no multiple
    of anything natural."""
    monkeypatch.setattr(merge_engine, "SMALL_ELEMENTS", 5000)
    monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 3331)
    m = models["SD2"]
    out = tmp_path / "chunked.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), str(m["C"]), method="sum_twice", alpha=0.4, beta=0.3),
                out, workers=2)
    A, B, C = _load(m["A"]), _load(m["B"]), _load(m["C"])
    multi = [k for k, v in A.items() if v.numel() > 5000 and v.numel() % 3331]
    assert len(multi) > 100                                     # many tensors chunked, with a partial last chunk
    assert_same(_load(out), ref_merge("sum_twice", A, B, C, "SD2", 0.4, 0.3))


# ---------------------------------------------------------------------------------------------- blocks, presets
@pytest.mark.parametrize("arch,n", [("SD1", 25), ("SD2", 25), ("SDXL", 19), ("SDXL-refiner", 25)])
def test_block_weighted(models, tmp_path, arch, n):
    m = models[arch]
    vals = [round(0.03 * i + 0.01, 4) for i in range(n)]
    names = ref_names(arch)
    out = tmp_path / "mbw.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), blocks=",".join(map(str, vals)), base_alpha=0.9), out)
    ratios = dict(zip(names, [0.9] + vals))
    A, B = _load(m["A"]), _load(m["B"])
    assert_same(_load(out), ref_merge("weighted_sum", A, B, None, arch, ratios))
    # the BASE-first form gives the same file contents
    out2 = tmp_path / "mbw26.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), blocks=[0.9] + vals), out2)
    assert_same(_load(out2), _load(out))


def test_block_weighted_beta_add_difference(models, tmp_path):
    m = models["SD1"]
    al = [0.5] * 25
    al[12] = 0.0  # M00 untouched
    out = tmp_path / "ad.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), str(m["C"]), method="triple_sum", alpha=0.2, blocks=al,
                            blocks_beta=[0.1] * 25, beta=0.3), out)
    names = ref_names("SD1")
    A, B, C = _load(m["A"]), _load(m["B"]), _load(m["C"])
    ref = ref_merge("triple_sum", A, B, C, "SD1", dict(zip(names, [0.2] + al)), dict(zip(names, [0.3] + [0.1] * 25)))
    assert_same(_load(out), ref)


# A few rows of supermerger's scripts/mbwpresets.txt (BASE first), checked value by value.
SUPERMERGER_ROWS = {
    "GRAD_V": "0,1,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,"
              "0.1666666667,0.0833333333,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,"
              "0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0",
    "WRAP12": "0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1",
    "MID12_50": "0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0",
    "OUT12_5": "0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1",
    "RING08_SOFT": "0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0",
    "RING10_3": "0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0",
    "SMOOTHSTEP": "0,0,0.00506365740740741,0.0196759259259259,0.04296875,0.0740740740740741,0.112123842592593,"
                  "0.15625,0.205584490740741,0.259259259259259,0.31640625,0.376157407407407,0.437644675925926,0.5,"
                  "0.562355324074074,0.623842592592592,0.68359375,0.740740740740741,0.794415509259259,0.84375,"
                  "0.887876157407408,0.925925925925926,0.95703125,0.980324074074074,0.994936342592593,1",
    "SMOOTHSTEP*2": "0,0,0.0101273148148148,0.0393518518518519,0.0859375,0.148148148148148,0.224247685185185,"
                    "0.3125,0.411168981481482,0.518518518518519,0.6328125,0.752314814814815,0.875289351851852,1.,"
                    "0.875289351851852,0.752314814814815,0.6328125,0.518518518518519,0.411168981481481,0.3125,"
                    "0.224247685185184,0.148148148148148,0.0859375,0.0393518518518512,0.0101273148148153,0",
    "SMOOTHSTEP/3": "0,0,0.04296875,0.15625,0.31640625,0.5,0.68359375,0.84375,0.95703125,1.,0.95703125,0.84375,"
                    "0.68359375,0.5,0.31640625,0.15625,0.04296875,0.,0.04296875,0.15625,0.31640625,0.5,0.68359375,"
                    "0.84375,0.95703125,1",
    "REVERSE_COSINE": "0,0,0.00427756931309475,0.0170370868554659,0.0380602337443566,0.0669872981077808,"
                      "0.103323329854383,0.146446609406726,0.19561928549564,0.25,0.308658283817455,"
                      "0.37059047744874,0.434736903889974,0.5,0.565263096110026,0.62940952255126,"
                      "0.691341716182545,0.75,0.804380714504361,0.853553390593274,0.896676670145618,"
                      "0.933012701892219,0.961939766255643,0.982962913144534,0.995722430686905,1",
    "FAKE_CUBIC_HERMITE": "0,0,0.157576195987654,0.28491512345679,0.384765625,0.459876543209877,"
                          "0.512996720679012,0.546875,0.564260223765432,0.567901234567901,0.560546875,"
                          "0.544945987654321,0.523847415123457,0.5,0.476152584876543,0.455054012345679,"
                          "0.439453125,0.432098765432099,0.435739776234568,0.453125,0.487003279320987,"
                          "0.540123456790124,0.615234375,0.71508487654321,0.842423804012347,1",
    "ALL_B": ",".join(["1"] * 26),
}
ISSUE_PRESETS = ["GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75", "WRAP08", "WRAP12", "WRAP14", "WRAP16", "MID12_50",
                 "OUT07", "OUT12", "OUT12_5", "RING08_SOFT", "RING08_5", "RING10_5", "RING10_3", "SMOOTHSTEP",
                 "REVERSE_SMOOTHSTEP", "SMOOTHSTEP*2", "R_SMOOTHSTEP*2", "SMOOTHSTEP*3", "R_SMOOTHSTEP*3",
                 "SMOOTHSTEP*4", "R_SMOOTHSTEP*4", "SMOOTHSTEP/2", "R_SMOOTHSTEP/2", "SMOOTHSTEP/3",
                 "R_SMOOTHSTEP/3", "SMOOTHSTEP/4", "R_SMOOTHSTEP/4", "COSINE", "REVERSE_COSINE",
                 "TRUE_CUBIC_HERMITE", "TRUE_REVERSE_CUBIC_HERMITE", "FAKE_CUBIC_HERMITE",
                 "FAKE_REVERSE_CUBIC_HERMITE", "ALL_A", "ALL_B"]


def test_preset_values_match_supermerger():
    assert set(ISSUE_PRESETS) <= set(PRESETS)
    for name, row in SUPERMERGER_ROWS.items():
        want = [float(v) for v in row.split(",")]
        base, unet = PRESETS[name]
        assert len(unet) == 25
        assert [base] + unet == pytest.approx(want, abs=1e-9), name
    for name, (base, unet) in PRESETS.items():
        assert all(-1e-12 <= v <= 1 + 1e-12 for v in [base] + unet), name


@pytest.fixture(scope="session")
def subsets(models):
    """Small in-memory state dicts (a few keys of every block + CLIP) for the many preset merges."""
    out = {}
    for arch in ("SD1", "SDXL", "SDXL-refiner"):
        A, B, C = _load(models[arch]["A"]), _load(models[arch]["B"]), _load(models[arch]["C"])
        keep, seen = [], set()
        for k in A:
            blk = ref_block(k, arch)
            tag = (blk, k.endswith("bias"))
            if (tag not in seen or k.endswith(POS) or k.startswith("first_stage_model.encoder.conv_in")
                    or "label_emb" in k or k.endswith("proj_in.weight") or "embedders.1.model.ln_final" in k
                    or "transformer.text_model.final_layer_norm" in k):
                seen.add(tag)
                keep.append(k)
        out[arch] = ({k: A[k] for k in keep}, {k: B[k] for k in keep}, {k: C[k] for k in keep})
    return out


@pytest.mark.parametrize("preset", ISSUE_PRESETS)
def test_every_preset_on_sd1_and_sdxl(subsets, preset):
    for arch in ("SD1", "SDXL", "SDXL-refiner"):   # the refiner has SD1's 25 UNet blocks: the preset as it is
        A, B, _ = subsets[arch]
        res = merge_in_memory(MergeRecipe("A", "B", preset=preset, alpha=0.5, save_metadata=False), a=A, b=B)
        base, unet = PRESETS[preset]
        if arch == "SDXL":  # supermerger's weighttoxl: IN00..IN08 + M00 + OUT00..OUT08
            unet = unet[:9] + unet[12:22]
        ratios = dict(zip(ref_names(arch), [base] + unet))
        assert_same(res.state_dict, ref_merge("weighted_sum", A, B, None, arch, ratios))


# ---------------------------------------------------------------------------------------------- TIES / DARE
def ref_ties(a, others, alpha, density):
    a = a.float()
    trimmed = []
    for x in others:
        d = x.float() - a
        k = math.ceil(density * d.numel())
        thr = d.abs().reshape(-1).sort(descending=True).values[k - 1]  # ties with the k-th magnitude are kept
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    num = (t * agree).sum(0)
    cnt = agree.sum(0)
    merged = torch.where(cnt > 0, num / cnt.clamp_min(1), torch.zeros_like(num))
    return a + merged * alpha


def ref_dare(a, others, alpha, p, seed, key):
    import zlib

    a = a.float()
    acc = torch.zeros_like(a)
    for i, x in enumerate(others):
        s = (seed * 1000003 + zlib.crc32(f"{key}#{i}".encode())) % 2 ** 63
        r = torch.rand(a.shape, generator=torch.Generator().manual_seed(s))
        d = x.float() - a
        acc += torch.where(r >= p, d / (1 - p), torch.zeros_like(d))
    return a + acc * alpha


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare(subsets, method):
    A, B, C = subsets["SD1"]
    beta = 0.3 if method == "ties" else 0.6
    recipe = MergeRecipe("A", "B", "C", method=method, alpha=0.8, beta=beta, seed=7, dtype="fp32",
                         save_metadata=False)
    got = merge_in_memory(recipe, a=A, b=B, c=C).state_dict
    for k, a in A.items():
        if k.endswith(POS):
            assert torch.equal(got[k], a)
            continue
        if method == "ties":
            ref = ref_ties(a, [B[k], C[k]], 0.8, beta)
        else:
            ref = ref_dare(a, [B[k], C[k]], 0.8, beta, 7, k)
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-6, msg=k)
    # reproducible (also with two workers: the mask depends on the key, not the order), and the seed matters
    assert_same(merge_in_memory(recipe, a=A, b=B, c=C, workers=2).state_dict, got)
    if method == "dare":
        import dataclasses

        other = merge_in_memory(dataclasses.replace(recipe, seed=8), a=A, b=B, c=C).state_dict
        k = next(k for k in A if k.startswith("model.diffusion_model.input_blocks.1.") and k.endswith("weight"))
        assert not torch.equal(other[k], got[k])


def test_dare_from_files_matches_memory(models, subsets, tmp_path):
    m = models["SD1"]
    recipe = MergeRecipe(str(m["A"]), str(m["B"]), method="dare", alpha=0.5, beta=0.5, seed=3, dtype="fp32",
                         save_metadata=False)
    out = tmp_path / "dare.safetensors"
    merge_files(recipe, out)
    A, B, _ = subsets["SD1"]
    mem = merge_in_memory(recipe, a=A, b=B).state_dict
    got = _load(out)
    for k in A:
        assert torch.equal(got[k], mem[k]), k


# ---------------------------------------------------------------------------------------------- options
def test_ema_position_ids_and_int_tensors(fixture_files, models, tmp_path):
    """A: a released-style .ckpt with model_ema.*, an int32 num_updates and float 75.9975-style position_ids."""
    a_path = fixture_files["sd1_ema_junk_ckpt"]
    A = _load(a_path)
    B = _derive(A, 5, torch.float16)
    b_path = tmp_path / "b.safetensors"
    save_file(B, str(b_path))
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    out = tmp_path / "noema.safetensors"
    rep = merge_files(MergeRecipe(str(a_path), str(b_path), alpha=0.25), out)
    got = _load(out)
    assert not any(k.startswith("model_ema.") for k in got)
    assert rep.ema_dropped == sum(1 for k in A if k.startswith("model_ema."))
    assert got[pos].dtype == A[pos].dtype and torch.equal(got[pos], A[pos])  # kept from A, never interpolated
    out2 = tmp_path / "ema.safetensors"
    merge_files(MergeRecipe(str(a_path), str(b_path), alpha=0.25, keep_ema=True, fix_position_ids=True), out2)
    got2 = _load(out2)
    assert got2[pos].dtype == torch.int64 and torch.equal(got2[pos], torch.arange(77).reshape(1, 77))
    assert got2["model_ema.num_updates"].dtype == A["model_ema.num_updates"].dtype
    assert torch.equal(got2["model_ema.num_updates"], A["model_ema.num_updates"])
    ema = [k for k in A if k.startswith("model_ema.") and A[k].is_floating_point()]
    assert ema
    for k in ema[:20] + [k for k in A if not k.startswith("model_ema.")][:50]:
        if k == pos or not A[k].is_floating_point():
            continue
        assert torch.equal(got2[k], ref_formula("weighted_sum", A[k], B[k], None, 0.25, 0).half()), k


def test_bake_vae_and_discard(fixture_files, models, tmp_path):
    m = models["SD1"]
    for vname in ("vae", "vae_prefixed_pt"):
        vpath = fixture_files[vname]
        V = _load(vpath)
        out = tmp_path / f"{vname}.safetensors"
        rep = merge_files(MergeRecipe(str(m["A"]), str(m["B"]), alpha=0.5, bake_vae=str(vpath),
                                      discard=r"^first_stage_model\.decoder\.mid"), out)
        got = _load(out)
        vae_keys = {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k for k in V}
        assert rep.vae_baked > 0
        for k in vae_keys:
            full = "first_stage_model." + k
            if k.startswith("decoder.mid"):
                assert full not in got
                continue
            src = V[k] if k in V else V[full]
            assert torch.equal(got[full], src.half()), full
        assert rep.discarded == sum(1 for k in _load(m["A"]) if k.startswith("first_stage_model.decoder.mid"))
        meta = _meta(out)
        assert json.loads(meta["sd_merge_recipe"])["discard_weights"] == r"^first_stage_model\.decoder\.mid"


@pytest.mark.parametrize("variant,cin", [("sd1_inpainting", 9), ("sd1_ip2p", 8)])
def test_inpainting_a_merges_first_four_channels(fixture_files, models, tmp_path, variant, cin):
    a_path = fixture_files[variant]
    A = _load(a_path)
    B = {k: v for k, v in _load(models["SD1"]["B"]).items()}
    C = _load(models["SD1"]["C"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert A[key].shape[1] == cin and B[key].shape[1] == 4
    out = tmp_path / "inp.safetensors"
    rep = merge_files(MergeRecipe(str(a_path), str(models["SD1"]["B"]), str(models["SD1"]["C"]),
                                  method="add_difference", alpha=1.0), out)
    got = _load(out)
    want = A[key].float().clone()
    want[:, :4] = A[key][:, :4].float() + (B[key].float() - C[key].float()) * 1.0
    assert torch.equal(got[key], want.half())
    assert rep.partial_input_channels == [key]
    assert json.loads(_meta(out)["sd_merge_recipe"])["is_inpainting"] == (variant == "sd1_inpainting")
    k2 = "model.diffusion_model.output_blocks.3.0.skip_connection.weight"
    assert torch.equal(got[k2], (A[k2].float() + (B[k2].float() - C[k2].float())).half())
    with pytest.raises(ArchitectureError, match="put the"):
        merge_files(MergeRecipe(str(models["SD1"]["B"]), str(a_path)), tmp_path / "rev.safetensors")


def test_missing_keys_taken_from_a_and_counted(models, tmp_path):
    m = models["SDXL"]
    B = dict(_load(m["B"]))
    dropped = [k for k in B if "output_blocks.2." in k]
    for k in dropped:
        del B[k]
    b_path = tmp_path / "b_missing.safetensors"
    save_file(B, str(b_path))
    out = tmp_path / "o.safetensors"
    rep = merge_files(MergeRecipe(str(m["A"]), str(b_path), alpha=0.5), out)
    assert sorted(rep.missing_from_b) == sorted(dropped)
    A, got = _load(m["A"]), _load(out)
    for k in dropped:
        assert torch.equal(got[k], A[k])


def test_architectures_must_match(models, tmp_path):
    with pytest.raises(ArchitectureError, match="SDXL"):
        merge_files(MergeRecipe(str(models["SD1"]["A"]), str(models["SDXL"]["B"])), tmp_path / "x.safetensors")
    with pytest.raises(ArchitectureError):
        merge_files(MergeRecipe(str(models["SD1"]["A"]), str(models["SD2"]["B"])), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------- metadata
def _meta(path) -> Dict[str, str]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)).get("__metadata__", {})


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_metadata_in_the_webui_format(models, tmp_path):
    m = models["SD2"]
    out = tmp_path / "first.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), str(m["C"]), method="add_difference", alpha=0.6), out)
    meta = _meta(out)
    assert meta["format"] == "pt"
    rec = json.loads(meta["sd_merge_recipe"])
    assert rec["primary_model_hash"] == _sha(m["A"])
    assert rec["secondary_model_hash"] == _sha(m["B"])
    assert rec["tertiary_model_hash"] == _sha(m["C"])
    assert rec["interp_method"] == "Add difference" and rec["multiplier"] == 0.6 and rec["save_as_half"] is True
    models_meta = json.loads(meta["sd_merge_models"])
    assert set(models_meta) == {_sha(m["A"]), _sha(m["B"]), _sha(m["C"])}
    legacy = hashlib.sha256(Path(m["A"]).read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert models_meta[_sha(m["A"])] == {"name": "SD2_A.safetensors", "legacy_hash": legacy, "sd_merge_recipe": None}
    # a merge of a merge nests the parent's recipe and carries its models
    out2 = tmp_path / "second.safetensors"
    merge_files(MergeRecipe(str(out), str(m["B"]), alpha=0.5, preset="GRAD_V"), out2)
    mm2 = json.loads(_meta(out2)["sd_merge_models"])
    assert mm2[_sha(out)]["sd_merge_recipe"]["interp_method"] == "Add difference"
    assert _sha(m["C"]) in mm2
    assert json.loads(_meta(out2)["sd_merge_recipe"])["preset"] == "GRAD_V"


#: the recipe fields A1111 1.10's merger writes (modules/extras.py run_modelmerger, ``merge_recipe``)
WEBUI_RECIPE_FIELDS = {"type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method",
                       "multiplier", "save_as_half", "custom_name", "config_source", "bake_in_vae", "discard_weights",
                       "is_inpainting", "is_instruct_pix2pix"}


def test_inputs_metadata_is_carried_forward_as_the_webui_merger_does(tmp_path):
    """Issue 10, defect 8. The rule, read from A1111 1.10 modules/extras.py ``run_modelmerger`` with its UI
    defaults ("Save metadata" and "Copy metadata from merged models" on):
    metadata = {}; update it with A's metadata, then B's, then C's; metadata["format"] = "pt";
    metadata["sd_merge_recipe"] = json(recipe); sd_merge_models = {}; for A, B, C in turn:
    sd_merge_models[sha256] = {"name", "legacy_hash", "sd_merge_recipe": the input's own recipe (decoded, as
    CheckpointInfo.metadata holds JSON objects) or None}, then sd_merge_models.update(the input's sd_merge_models);
    metadata["sd_merge_models"] = json(sd_merge_models). Our fields are added to the recipe, never replace these."""
    from lib_sdtoolkit.samples import factory

    parent_sha = "ab" * 32
    parent_models = {parent_sha: {"name": "parent.safetensors", "legacy_hash": "12345678", "sd_merge_recipe": None}}
    a_recipe = {"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.25}
    metas = {
        "A": {"modelspec.title": "Model A", "ss_base_model_version": "sd_v1", "shared": "from A",
              "sd_merge_recipe": json.dumps(a_recipe), "sd_merge_models": json.dumps(parent_models)},
        "B": {"modelspec.title": "Model B", "shared": "from B", "b_only": "kept"},
        "C": {"c_only": "x", "shared": "from C", "format": "pt"},
    }
    paths = {n: factory.write_checkpoint(tmp_path / f"{n}.safetensors", "SD1", seed=i + 1, metadata=metas[n])
             for i, n in enumerate("ABC")}
    out = tmp_path / "merged.safetensors"
    merge_files(MergeRecipe(str(paths["A"]), str(paths["B"]), str(paths["C"]), method="add_difference", alpha=0.5),
                out)
    meta = _meta(out)

    expected: Dict[str, str] = {}
    for n in "ABC":
        expected.update(metas[n])
    expected["format"] = "pt"
    for k, v in expected.items():
        if k not in ("sd_merge_recipe", "sd_merge_models"):
            assert meta.get(k) == v, k
    rec = json.loads(meta["sd_merge_recipe"])
    assert WEBUI_RECIPE_FIELDS <= set(rec)
    assert (rec["primary_model_hash"], rec["secondary_model_hash"], rec["tertiary_model_hash"]) == \
        tuple(_sha(paths[n]) for n in "ABC")

    def decoded(v):
        return json.loads(v) if isinstance(v, str) and v.startswith("{") else v

    want_models: Dict[str, object] = {}
    for n in "ABC":
        p = paths[n]
        legacy = hashlib.sha256(Path(p).read_bytes()[0x100000:0x110000]).hexdigest()[:8]
        want_models[_sha(p)] = {"name": p.name, "legacy_hash": legacy,
                                "sd_merge_recipe": decoded(metas[n].get("sd_merge_recipe"))}
        want_models.update(decoded(metas[n].get("sd_merge_models")) or {})
    assert json.loads(meta["sd_merge_models"]) == want_models
    assert set(meta) == set(expected) | {"sd_merge_recipe", "sd_merge_models"}


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_writing(models, tmp_path):
    m = models["SD1"]
    a, b = str(m["A"]), str(m["B"])
    with pytest.raises(OutputExistsError):
        merge_files(MergeRecipe(a, b), a)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        merge_files(MergeRecipe(a, b), existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InvalidInputError, match="expected 25"):
        merge_files(MergeRecipe(a, b, blocks="0.5," * 23 + "0.5"), tmp_path / "x.safetensors")
    with pytest.raises(InvalidInputError, match="expected 19"):
        merge_files(MergeRecipe(str(models["SDXL"]["A"]), str(models["SDXL"]["B"]), blocks=[0.5] * 25),
                    tmp_path / "x.safetensors")
    with pytest.raises(InvalidInputError, match="unknown preset"):
        merge_files(MergeRecipe(a, b, preset="NOPE"), tmp_path / "x.safetensors")
    with pytest.raises(InvalidInputError, match="outside"):
        merge_files(MergeRecipe(a, b, alpha=1.5), tmp_path / "x.safetensors")
    with pytest.raises(InvalidInputError, match="outside"):
        merge_files(MergeRecipe(a, b, blocks=[0.5] * 24 + [-0.1]), tmp_path / "x.safetensors")
    with pytest.raises(InvalidInputError, match="takes 3 models"):
        merge_files(MergeRecipe(a, b, method="add_difference"), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exists.safetensors"]


def test_extrapolation_when_allowed(models, tmp_path):
    m = models["SD1"]
    out = tmp_path / "ex.safetensors"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), alpha=1.5, allow_extrapolation=True, dtype="fp32"), out)
    A, B = _load(m["A"]), _load(m["B"])
    assert_same(_load(out), ref_merge("weighted_sum", A, B, None, "SD1", 1.5, out_dtype=torch.float32))


def test_disk_full_leaves_no_partial_output(models, tmp_path, monkeypatch):
    m = models["SD1"]
    real = os.pwrite
    calls = {"n": 0, "fail_at": None}

    def pwrite(fd, data, pos):
        calls["n"] += 1
        if calls["fail_at"] is not None and calls["n"] >= calls["fail_at"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    # the disk fills up half-way through: the writes of a whole merge, counted first
    merge_files(MergeRecipe(str(m["A"]), str(m["B"])), tmp_path / "counted.safetensors")
    (tmp_path / "counted.safetensors").unlink()
    assert calls["n"] >= 4
    calls.update(fail_at=calls["n"] // 2, n=0)
    out = tmp_path / "full.safetensors"
    with pytest.raises(ModelFileError, match="disk full"):
        merge_files(MergeRecipe(str(m["A"]), str(m["B"])), out)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_input(models, tmp_path):
    m = models["SD1"]
    data = Path(m["B"]).read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        merge_files(MergeRecipe(str(m["A"]), str(bad)), tmp_path / "o.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelFileError):
        merge_files(MergeRecipe(str(m["A"]), str(junk)), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------------------------- concurrency, formats
def test_two_merges_at_once(models, tmp_path):
    m = models["SD1"]
    r1 = MergeRecipe(str(m["A"]), str(m["B"]), alpha=0.2)
    r2 = MergeRecipe(str(m["A"]), str(m["B"]), str(m["C"]), method="add_difference", alpha=0.9)
    outs = [tmp_path / "p1.safetensors", tmp_path / "p2.safetensors"]
    errors = []

    def run(r, o):
        try:
            merge_files(r, o)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(r, o)) for r, o in zip((r1, r2), outs)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors
    A, B, C = _load(m["A"]), _load(m["B"]), _load(m["C"])
    assert_same(_load(outs[0]), ref_merge("weighted_sum", A, B, None, "SD1", 0.2))
    assert_same(_load(outs[1]), ref_merge("add_difference", A, B, C, "SD1", 0.9))


def test_ckpt_input_and_output(models, fixture_files, tmp_path):
    m = models["SD1"]
    out = tmp_path / "o.ckpt"
    merge_files(MergeRecipe(str(m["A"]), str(m["B"]), alpha=0.4), out)
    A, B = _load(m["A"]), _load(m["B"])
    assert_same(_load(out), ref_merge("weighted_sum", A, B, None, "SD1", 0.4))


# ---------------------------------------------------------------------------------------------- in memory
def _module_from(sd: Dict[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    for k, v in sd.items():
        *path, leaf = k.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if v.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, v.clone())
    return root


def test_merge_into_loaded_module_and_save_current_merge(models, tmp_path):
    m = models["SD1"]
    A, B = _load(m["A"]), _load(m["B"])
    module = _module_from(A)  # fp16, like the WebUI's loaded model
    recipe = MergeRecipe(str(m["A"]), str(m["B"]), blocks=[0.1 * (i % 10) for i in range(25)], base_alpha=0.3)
    res = merge_in_memory(recipe, into=module, workers=2)
    names = ref_names("SD1")
    ref = ref_merge("weighted_sum", A, B, None, "SD1", dict(zip(names, [0.3] + [0.1 * (i % 10) for i in range(25)])))
    assert_same({k: v for k, v in module.state_dict().items()}, ref)
    saved = res.save(tmp_path / "current.safetensors")
    streamed = tmp_path / "streamed.safetensors"
    merge_files(recipe, streamed)
    assert_same(_load(saved), _load(streamed))
    # a state dict result too, from the files: its metadata names the inputs by sha256
    res2 = merge_in_memory(recipe)
    assert_same(res2.state_dict, ref)
    assert json.loads(res2.metadata["sd_merge_recipe"])["primary_model_hash"] == _sha(m["A"])
    assert torch.equal(A["model.diffusion_model.out.2.bias"], _load(m["A"])["model.diffusion_model.out.2.bias"])


# ---------------------------------------------------------------------------------------------- faces
def test_cli_api_and_tab_give_identical_files(models, fixture_files, tmp_path, capsys):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.cli import main
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router
    from lib_sdtoolkit.ui import merge_tab

    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    ck = root / "Stable-diffusion"
    for n in ("A", "B", "C"):
        os.symlink(models["SD1"][n], ck / f"m{n}.safetensors")
    os.symlink(fixture_files["vae"], root / "VAE" / "v.safetensors")
    blocks = ",".join(str(0.04 * i) for i in range(26))
    common = dict(method="add_difference", alpha=0.35, blocks=blocks, fix_position_ids=True,
                  discard=r"decoder\.mid", dtype="bf16")
    rc = main(["merge", str(ck / "mA.safetensors"), str(ck / "mB.safetensors"), str(ck / "mC.safetensors"),
               "-o", str(ck / "cli.safetensors"), "--method", "add_difference", "--alpha", "0.35",
               "--blocks", blocks, "--fix-position-ids", "--discard", r"decoder\.mid", "--dtype", "bf16",
               "--bake-vae", str(root / "VAE" / "v.safetensors")])
    assert rc == 0
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    client = TestClient(app)
    r = client.post("/sdtoolkit/v1/merge", json=dict(model_a="mA", model_b="mB.safetensors", model_c="mC",
                                                   bake_vae="v", output="api.safetensors", **common))
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "api.safetensors"
    html_, text, rep = merge_tab.run_merge(host, dict(
        model_a="mA.safetensors", model_b="mB.safetensors", model_c="mC.safetensors", method="add_difference",
        alpha=0.35, beta=None, blocks=blocks, base_alpha="", dtype="bf16", keep_ema=False, fix_position_ids=True,
        bake_vae="v.safetensors", discard=r"decoder\.mid", seed=0, device="cpu", allow_extrapolation=False,
        output="tab.safetensors", overwrite=False))
    assert rep is not None, text
    outs = [_read(ck / f"{n}.safetensors") for n in ("cli", "api", "tab")]
    assert list(outs[0]) == list(outs[1]) == list(outs[2])
    for k in outs[0]:
        assert outs[0][k].dtype == outs[1][k].dtype == outs[2][k].dtype
        b0 = outs[0][k].view(torch.uint8) if outs[0][k].numel() else outs[0][k]
        assert torch.equal(b0, outs[1][k].view(torch.uint8) if outs[1][k].numel() else outs[1][k]), k
        assert torch.equal(b0, outs[2][k].view(torch.uint8) if outs[2][k].numel() else outs[2][k]), k
    assert "cli.safetensors" in [p.name for p in host.list_models("checkpoint")]
    # errors: CLI exit 2 with one line, API 4xx JSON, tab message
    capsys.readouterr()
    assert main(["merge", str(ck / "mA.safetensors"), str(ck / "mB.safetensors"), "-o",
                 str(ck / "cli.safetensors")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(ck / "mA.safetensors"), str(ck / "mB.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                 "--preset", "NOPE"]) == 2
    r = client.post("/sdtoolkit/v1/merge", json=dict(model_a="mA", model_b="mB", output="api.safetensors"))
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    r = client.post("/sdtoolkit/v1/merge", json=dict(model_a="mA", model_b="mB", blocks=[0.5] * 3))
    assert r.status_code == 422 and "block values" in r.json()["detail"]
    r = client.post("/sdtoolkit/v1/merge", json=dict(model_a="../../etc/passwd", model_b="mB"))
    assert r.status_code == 403
    r = client.post("/sdtoolkit/v1/merge", json=dict(model_a="mA", model_b="mB", output="../evil.safetensors"))
    assert r.status_code == 422
    html_, text, rep = merge_tab.run_merge(host, dict(
        model_a="mA.safetensors", model_b="mB.safetensors", model_c="", method="weighted_sum", alpha=1.7, beta=None,
        blocks="", base_alpha="", dtype="fp16", keep_ema=False, fix_position_ids=False, bake_vae="None", discard="",
        seed=0, device="cpu", allow_extrapolation=False, output="t2", overwrite=False))
    assert rep is None and "outside" in text
    df, msg = merge_tab.block_table(host, "mA.safetensors", "GRAD_V", "", 0.5, "")
    assert list(df["ratio"])[1:] == pytest.approx(PRESETS["GRAD_V"][1])
