"""Merge on Flux.1 (issue 13, item 2): every method, every layout (BFL bare, all-in-one, diffusers), dev and
schnell, bf16 and fp8 inputs computed in float32, the output dtype the user picks (fp8 included), Flux's 58 merge
blocks, SD presets stretched over them, and the marker keys (``v_pred``/``ztsnr``) kept by every tool.

References, independent of the code under test: plain torch formulas on the tensors read back (ratios from a
block parser written here, not ``arch.blocks``), TIES by sorting (not ``kthvalue``), DARE with its own generator
stream, torch's own fp8 casts, ``numpy.interp`` for the preset stretch, diffusers' ``FluxTransformer2DModel``
module tree (by object identity) and sd-mecha's shipped ``flux-flux.yaml`` for the block of each key.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from lib_sdtoolkit.arch.blocks import block_names, block_of_key, vocabulary
from lib_sdtoolkit.errors import ArchitectureError, InvalidInputError
from lib_sdtoolkit.files import load_state_dict, open_model, save_safetensors
from lib_sdtoolkit.merge import MergeRecipe, merge_files, merge_in_memory
from lib_sdtoolkit.merge import engine as merge_engine
from lib_sdtoolkit.merge import methods as merge_methods
from lib_sdtoolkit.merge.presets import PRESETS, get_preset, parse_block_values
from lib_sdtoolkit.prune import PruneOptions, prune_file
from lib_sdtoolkit.samples import flux

LAYOUTS = ["bfl", "all-in-one", "diffusers"]
DT = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
OUT_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def ref_block(key: str) -> str:
    """The merge block of a Flux key, written from the layouts' own names (not arch.blocks)."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("double_blocks", "transformer_blocks") and (i == 0 or parts[i - 1] in ("diffusion_model",
                                                                                          "transformer")):
            return "D%02d" % int(parts[i + 1])
        if p in ("single_blocks", "single_transformer_blocks") and (i == 0 or parts[i - 1] in (
                "diffusion_model", "transformer")):
            return "S%02d" % int(parts[i + 1])
    return "BASE"


@pytest.fixture(scope="module")
def ff(tmp_path_factory):
    """(layout, variant, dtype, seed) -> a tiny Flux file; seeds 0/1/2 are models A/B/C."""
    d = tmp_path_factory.mktemp("fluxmerge")
    out = {}

    def get(layout, variant="dev", dt="bf16", seed=0):
        k = (layout, variant, dt, seed)
        if k not in out:
            out[k] = flux.write(d / f"{layout}-{variant}-{dt}-{seed}.safetensors", layout, variant, seed=seed,
                                dtype=DT[dt])
        return out[k]
    return get


def _ratios(seed=0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return [round(float(v), 4) for v in torch.rand(58, generator=g) * hi]


# ------------------------------------------------------------------------------------------------ blocks

def test_flux_block_vocabulary_from_diffusers_module_tree():
    """diffusers' module objects say which block each parameter is in (transformer_blocks[i] -> Di,
    single_transformer_blocks[i] -> Si, everything else BASE); our rule on the key names must agree."""
    names = block_names("Flux.1")
    assert names == ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]
    assert vocabulary()["Flux.1"] == names and set(vocabulary()) >= {"SD1", "SDXL", "Flux.1"}
    m = flux.build_diffusers_transformer("tiny", "dev", "meta")
    owner = {}
    for i, blk in enumerate(m.transformer_blocks):
        owner.update({id(p): f"D{i:02d}" for p in blk.parameters()})
    for i, blk in enumerate(m.single_transformer_blocks):
        owner.update({id(p): f"S{i:02d}" for p in blk.parameters()})
    for k, p in m.named_parameters():
        want = owner.get(id(p), "BASE")
        assert block_of_key(k, "Flux.1") == want, k
        assert block_of_key("transformer." + k, "Flux.1") == want, k


def test_flux_blocks_of_the_full_size_key_list(mecha_layout):
    """sd-mecha's 1439 keys of the all-in-one file: 19 double blocks and 38 single blocks of equal key counts,
    everything else (embedders, final_layer, VAE, CLIP-L, T5) BASE; the bare BFL names give the same blocks."""
    keys = [k for comp in mecha_layout("flux-flux").values() for k in comp]
    counts = {}
    for k in keys:
        b = block_of_key(k, "Flux.1")
        assert b == ref_block(k), k
        if k.startswith("model.diffusion_model."):
            assert block_of_key(k[len("model.diffusion_model."):], "Flux.1") == b
        counts[b] = counts.get(b, 0) + 1
    assert len(counts) == 58
    assert {counts[f"D{i:02d}"] for i in range(19)} == {counts["D00"]}
    assert {counts[f"S{i:02d}"] for i in range(38)} == {counts["S00"]}
    assert counts["D00"] * 19 + counts["S00"] * 38 + counts["BASE"] == len(keys) == 1439
    with pytest.raises(ArchitectureError, match="D19"):
        block_of_key("double_blocks.19.img_mod.lin.weight", "Flux.1")


def test_presets_are_stretched_over_flux_blocks():
    """Flux block j of 57 reads the 25-slot preset at slot j*24/56, linearly (numpy.interp)."""
    xs = np.linspace(0, 24, 57)
    for name, (base, sd) in PRESETS.items():
        b, vals = get_preset(name, "Flux.1")
        assert b == base and len(vals) == 57
        np.testing.assert_allclose(vals, np.interp(xs, np.arange(25), sd), rtol=0, atol=1e-12)
    _, grad = get_preset("GRAD_V", "Flux.1")
    assert grad[0] == 1.0 and grad[28] == 0.0 and grad[56] == 1.0  # D00 = IN00, S09 = M00, S37 = OUT11
    # lists of 57 / 58 values; any other count names Flux's blocks
    r = _ratios()
    assert parse_block_values(r, "Flux.1") == (r[0], r[1:])
    assert parse_block_values(r[1:], "Flux.1") == (None, r[1:])
    with pytest.raises(InvalidInputError, match=r"Flux.1: got 25, expected 57 \(D00..D18, S00..S37\) or 58"):
        parse_block_values([0.5] * 25, "Flux.1")


# ------------------------------------------------------------------------------------------------ merges

def _check_weighted(ff_out, a, b, ratios, out_dt, *, exact=True):
    sa, sb, so = load_state_dict(a), load_state_dict(b), load_state_dict(ff_out)
    assert list(so) == list(sa)
    by = {n: r for n, r in zip(block_names("Flux.1"), ratios)}
    for k, ta in sa.items():
        m = by[ref_block(k)]
        want = ta.float() * (1.0 - m) + sb[k].float() * m
        assert so[k].dtype == out_dt, k
        if out_dt == torch.float32:
            torch.testing.assert_close(so[k], want, rtol=1e-6, atol=1e-7)
        else:  # the float32 result cast once by torch itself
            assert torch.equal(so[k].view(torch.uint8), want.to(out_dt).view(torch.uint8)), k


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("dt", ["bf16", "fp8"])
def test_block_weighted_merge_every_layout_equals_torch(ff, tmp_path, layout, variant, dt):
    a, b = ff(layout, variant, dt, 0), ff(layout, variant, dt, 1)
    ratios = _ratios(seed=len(layout) + len(variant))
    out = tmp_path / "m.safetensors"
    rep = merge_files(MergeRecipe(str(a), str(b), blocks=ratios, dtype="fp32"), out, hash_cache=False)
    assert rep.architecture == "Flux.1" and rep.merged == rep.keys_total and not rep.missing_from_b
    assert list(rep.block_ratios) == block_names("Flux.1")
    _check_weighted(out, a, b, ratios, torch.float32)


@pytest.mark.parametrize("out", ["bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"])
def test_output_dtype_is_torchs_own_cast_of_the_fp32_result(ff, tmp_path, out):
    """fp8 e4m3 A + bf16 B (mixed inputs), streamed in chunks (the chunk size made tiny so fp8 chunk reads run)."""
    a, b = ff("bfl", "dev", "fp8", 0), ff("bfl", "dev", "bf16", 1)
    ratios = _ratios(seed=7)
    small, chunk = merge_engine.SMALL_ELEMENTS, merge_engine.CHUNK_ELEMENTS
    # 5000 / 3331 (not 1000 / 777, 2.5x the time): the 116 tiny Flux tensors over 5000 elements (up to 8192) are
    # read in a full and a partial chunk, so fp8 chunk reads still run at offsets inside a tensor
    merge_engine.SMALL_ELEMENTS, merge_engine.CHUNK_ELEMENTS = 5000, 3331
    try:
        merge_files(MergeRecipe(str(a), str(b), blocks=ratios, dtype=out), tmp_path / "m.safetensors",
                    hash_cache=False)
    finally:
        merge_engine.SMALL_ELEMENTS, merge_engine.CHUNK_ELEMENTS = small, chunk
    _check_weighted(tmp_path / "m.safetensors", a, b, ratios, OUT_DT[out])


def _ties_ref(a, others, alpha, density):
    deltas = []
    for x in others:
        d = x - a
        n = d.numel()
        k = max(1, math.ceil(density * n))
        thr = d.abs().reshape(-1).sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= thr, d, torch.zeros(())))
    t = torch.stack(deltas)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    cnt = agree.sum(0)
    mean = torch.where(cnt > 0, (t * agree).sum(0) / cnt.clamp_min(1), torch.zeros(()))
    return a + alpha * mean


def _dare_ref(a, others, alpha, p, seed, key):
    acc = torch.zeros_like(a)
    for i, x in enumerate(others):
        s = (seed * 1_000_003 + zlib.crc32(f"{key}#{i}".encode())) % (2 ** 63)
        keep = torch.rand(a.shape, generator=torch.Generator().manual_seed(s)) >= p
        acc += torch.where(keep, (x - a) / (1 - p), torch.zeros(()))
    return a + alpha * acc


REFS = {
    "weighted_sum": lambda a, b, c, m, be, k: a * (1 - m) + b * m,
    "add_difference": lambda a, b, c, m, be, k: a + (b - c) * m,
    "sum_twice": lambda a, b, c, m, be, k: (a * (1 - m) + b * m) * (1 - be) + c * be,
    "triple_sum": lambda a, b, c, m, be, k: a * (1 - m - be) + b * m + c * be,
    "ties": lambda a, b, c, m, be, k: _ties_ref(a, [b, c], m, be),
    "dare": lambda a, b, c, m, be, k: _dare_ref(a, [b, c], m, be, 5, k),
}


@pytest.mark.parametrize("method", list(REFS))
def test_every_method_on_flux_equals_plain_torch(ff, tmp_path, method):
    assert set(REFS) == set(merge_methods.names())  # a new method needs its reference here
    spec = merge_methods.get(method)
    a, b = ff("all-in-one", "dev", "fp8", 0), ff("all-in-one", "dev", "fp8", 1)
    c = ff("all-in-one", "dev", "bf16", 2)
    ratios = _ratios(seed=3, hi=0.6)
    beta = {"ties": 0.3, "dare": 0.5}.get(method, 0.3)
    recipe = MergeRecipe(str(a), str(b), str(c) if spec.models[1] == 3 else None, method=method, blocks=ratios,
                         beta=beta if spec.beta is not None else None, seed=5, dtype="fp32")
    rep = merge_files(recipe, tmp_path / "m.safetensors", hash_cache=False)
    assert rep.merged == rep.keys_total
    sa, sb, sc, so = (load_state_dict(p) for p in (a, b, c, tmp_path / "m.safetensors"))
    by = dict(zip(block_names("Flux.1"), ratios))
    for k, ta in sa.items():
        want = REFS[method](ta.float(), sb[k].float(), sc[k].float(), by[ref_block(k)], beta, k)
        torch.testing.assert_close(so[k], want, rtol=1e-5, atol=1e-6, msg=k)


def test_dev_with_schnell_and_refusals(ff, tmp_path, mecha_layout):
    dev, schnell = ff("bfl", "dev", "bf16", 0), ff("bfl", "schnell", "bf16", 1)
    rep = merge_files(MergeRecipe(str(dev), str(schnell), alpha=0.5), tmp_path / "ds.safetensors",
                      hash_cache=False)
    assert sorted(rep.missing_from_b) == sorted(k for k, _ in flux.bfl_specs() if k.startswith("guidance_in."))
    a = load_state_dict(dev)
    out = load_state_dict(tmp_path / "ds.safetensors")
    assert torch.equal(out["guidance_in.in_layer.weight"], a["guidance_in.in_layer.weight"].half())
    rep = merge_files(MergeRecipe(str(schnell), str(dev), alpha=0.5), tmp_path / "sd.safetensors", hash_cache=False)
    assert rep.only_in_b == 4 and "guidance_in.in_layer.weight" not in open_model(tmp_path / "sd.safetensors")
    # two layouts: refused before anything is written
    with pytest.raises(ArchitectureError, match="diffusers layout but A is bfl"):
        merge_files(MergeRecipe(str(dev), str(ff("diffusers", "dev", "bf16", 1))), tmp_path / "x.safetensors")
    # SD3: recognised, refused by name
    sd3 = {k: torch.zeros(s if len(s) < 2 else (2, 2)) for k, s in
           ((k, tuple(v["shape"])) for k, v in mecha_layout("sd3-comfyui")["diffuser"].items())}
    p3 = save_safetensors(tmp_path / "sd3.safetensors", {k: v for k, v in sd3.items()})
    with pytest.raises(ArchitectureError, match="SD3/SD3.5 model .*merging SD3 is not supported yet"):
        merge_files(MergeRecipe(str(p3), str(p3)), tmp_path / "y.safetensors")
    # a VAE baked into a transformer-only Flux is refused (it has no place for one)
    ae = flux.write(tmp_path / "ae.safetensors", "vae", dtype=torch.float32)
    with pytest.raises(ArchitectureError, match="only be baked into an all-in-one"):
        merge_files(MergeRecipe(str(dev), str(dev), bake_vae=str(ae)), tmp_path / "z.safetensors")
    assert not any((tmp_path / n).exists() for n in ("x.safetensors", "y.safetensors", "z.safetensors"))


def test_flux_with_sd_model_refused(ff, tmp_path, fixture_files):
    with pytest.raises(ArchitectureError, match="cannot merge a SD1 checkpoint with a Flux.1 one"):
        merge_files(MergeRecipe(str(ff("bfl", "dev", "bf16", 0)), str(fixture_files["sd1_fp16"])),
                    tmp_path / "x.safetensors")


def test_bake_ae_into_all_in_one_flux(ff, tmp_path):
    """The BFL ae.safetensors (bare ldm names) replaces the vae.* keys of an all-in-one file, as stored."""
    a, b = ff("all-in-one", "dev", "bf16", 0), ff("all-in-one", "dev", "bf16", 1)
    ae = flux.write(tmp_path / "ae.safetensors", "vae", seed=9, dtype=torch.float32)
    rep = merge_files(MergeRecipe(str(a), str(b), bake_vae=str(ae), dtype="bf16"), tmp_path / "m.safetensors",
                      hash_cache=False)
    vae = load_state_dict(ae)
    out = load_state_dict(tmp_path / "m.safetensors")
    assert rep.vae_baked == len(vae) and not any(k.startswith("first_stage_model.") for k in out)
    for k, t in vae.items():
        assert torch.equal(out["vae." + k], t.to(torch.bfloat16)), k


def test_in_memory_merge_of_flux_equals_file_merge(ff, tmp_path):
    a, b = ff("diffusers", "schnell", "fp8", 0), ff("diffusers", "schnell", "fp8", 1)
    ratios = _ratios(seed=11)
    res = merge_in_memory(MergeRecipe(str(a), str(b), blocks=ratios, dtype="fp32"), hash_cache=False)
    merge_files(MergeRecipe(str(a), str(b), blocks=ratios, dtype="fp32"), tmp_path / "m.safetensors",
                hash_cache=False)
    f = load_state_dict(tmp_path / "m.safetensors")
    assert all(torch.equal(res.state_dict[k], f[k]) for k in f)


# ------------------------------------------------------------------------------------------------ markers

@pytest.fixture(scope="module")
def vpred(tmp_path_factory, fixture_files):
    """The session's tiny SDXL as a NoobAI-style v-pred model (empty float32 ``v_pred``/``ztsnr``) and an eps B."""
    d = tmp_path_factory.mktemp("vpred")
    base = load_state_dict(fixture_files["sdxl"])
    a = dict(base, v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    b = {k: -v if v.dtype.is_floating_point and not k.endswith("position_ids") else v for k, v in base.items()}
    return (save_safetensors(d / "vpred.safetensors", a, {"modelspec.prediction_type": "v"}),
            save_safetensors(d / "eps.safetensors", b))


def _has_markers(path):
    with open_model(path) as r:
        for m in ("v_pred", "ztsnr"):
            assert m in r, (path, m)
            assert r.info(m).dtype == torch.float32 and tuple(r.info(m).shape) == (0,), (path, m)
    return True


def test_vpred_markers_through_every_tool(vpred, tmp_path, fixture_files):
    """merge (safetensors, ckpt, preset + baked VAE, fp8 output), merge in memory then save (state dict and into a
    module, as the WebUI's live merge does), prune (whole file, UNet + VAE), LoRA bake: v_pred and ztsnr stay, as
    stored (empty float32)."""
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.synth import make_lora_state_dict

    a, b = vpred
    outs = []
    outs.append(merge_files(MergeRecipe(str(a), str(b), dtype="fp16"), tmp_path / "m1.safetensors",
                            hash_cache=False).output)
    outs.append(merge_files(MergeRecipe(str(a), str(b), preset="GRAD_V", dtype="fp8_e4m3fn",
                                        bake_vae=str(fixture_files["vae"])), tmp_path / "m2.safetensors",
                            hash_cache=False).output)
    ck = merge_files(MergeRecipe(str(a), str(b)), tmp_path / "m4.ckpt", hash_cache=False)
    sd = torch.load(ck.output, weights_only=True)["state_dict"]
    assert sd["v_pred"].dtype == torch.float32 and sd["ztsnr"].shape == (0,)
    res = merge_in_memory(MergeRecipe(str(a), str(b), dtype="bf16"), hash_cache=False)
    outs.append(res.save(tmp_path / "m5.safetensors"))
    # into a loaded module (the WebUI's model holds no marker tensors): saved with A's markers
    base = load_state_dict(a)

    class Named(torch.nn.Module):  # state_dict keys with the checkpoint's dots
        def __init__(self, sd):
            super().__init__()
            self._sd = sd

        def state_dict(self, *a, **k):
            return self._sd

    named = Named({k: t.clone() for k, t in base.items() if k not in ("v_pred", "ztsnr")})
    res = merge_in_memory(MergeRecipe(str(a), str(b), dtype="fp16"), a=str(a), into=named, hash_cache=False)
    assert set(res.markers) == {"v_pred", "ztsnr"} and "v_pred" in res.report.not_in_module
    outs.append(res.save(tmp_path / "m6.safetensors"))
    for only in (None, ["unet", "vae"]):
        outs.append(prune_file(a, tmp_path / f"p{len(outs)}.safetensors", PruneOptions(dtype="bf16",
                                                                                       only=only)).output)
    with open_model(a) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    lora = save_safetensors(tmp_path / "l.safetensors", make_lora_state_dict(
        lambda k: shapes.get(k), "SDXL", rank=2, seed=1, name_filter=lambda n: "attn2_to_v" in n))
    outs.append(bake(a, [(lora, 0.7)], tmp_path / "baked.safetensors")["output"])
    for p in outs:
        assert _has_markers(p)
    # a tool that drops the UNet drops the markers with it (they describe the UNet's sampling)
    te = prune_file(a, tmp_path / "te.safetensors", PruneOptions(only=["text_encoders"]))
    assert "v_pred" not in open_model(te.output)


def test_prune_all_in_one_flux_drops_what_is_asked_and_keeps_markers(ff, tmp_path):
    src = load_state_dict(ff("all-in-one", "schnell", "bf16", 0))
    p = save_safetensors(tmp_path / "aio.safetensors", dict(src, ztsnr=torch.tensor([])))
    res = prune_file(p, tmp_path / "no_t5.safetensors",
                     PruneOptions(dtype="keep", only=["unet", "vae", "text_encoder"]))
    out = load_state_dict(res.output)
    assert res.dropped == {"text_encoder_2": sum(1 for k in src if k.startswith("text_encoders.t5xxl."))}
    assert set(out) == {k for k in src if not k.startswith("text_encoders.t5xxl.")} | {"ztsnr"}
    assert all(torch.equal(out[k], src[k]) for k in src if k in out)
    assert out["ztsnr"].dtype == torch.float32
