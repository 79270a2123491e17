"""Models of 2026 (issue 13, recognition): Flux.1 dev/schnell in every layout, SD3 named, the separate component
files, SDXL prediction type / ztsnr / family from markers and metadata, fp8 tensors, GGUF refused, marker keys
kept by prune and merge.

References, all independent of our tables: sd-mecha's shipped key lists (``flux-flux.yaml``, ``sd3-comfyui.yaml``,
names and full-size shapes), diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` state dicts and its
own BFL->diffusers converter, transformers' CLIP / T5 modules, ldm's VAE ``Encoder``/``Decoder``, torch's own fp8
casts. Files are tiny real-named safetensors on disk.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.arch import detect, split_components
from lib_sdtoolkit.dedup import content_hash
from lib_sdtoolkit.errors import ModelFileError
from lib_sdtoolkit.files import load_state_dict, open_model, save_safetensors
from lib_sdtoolkit.files.hashes import hash_file
from lib_sdtoolkit.inspect import format_report, inspect_file
from lib_sdtoolkit.merge import MergeRecipe, merge_files
from lib_sdtoolkit.prune import PruneOptions, prune_file
from lib_sdtoolkit.samples import factory
from lib_sdtoolkit.samples import flux

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
LAYOUTS = ["bfl", "all-in-one", "diffusers"]


def _mecha_shapes(mecha_layout, name):
    return {k: tuple(v["shape"]) for comp in mecha_layout(name).values() for k, v in comp.items()}


# ------------------------------------------------------------------------------------------------ layouts vs refs

def test_bfl_layout_equals_sd_mecha_flux_key_list(mecha_layout):
    """Our full-width all-in-one layout (BFL transformer + ae VAE + CLIP-L + T5-XXL) is sd-mecha's list exactly."""
    ref = _mecha_shapes(mecha_layout, "flux-flux")
    ours = dict(flux.specs("all-in-one", "dev", "full"))
    assert len(ref) == 1439
    assert ours == ref
    # schnell: the same without the 4 guidance_in tensors
    schnell = dict(flux.specs("bfl", "schnell", "full"))
    assert set(schnell) == {k[len("model.diffusion_model."):] for k in mecha_layout("flux-flux")["diffuser"]
                            if ".guidance_in." not in k}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_layout_converts_to_diffusers_model_with_diffusers_converter(variant):
    """diffusers' own converter (hard-coded at width 3072, so run at full width on meta) turns our BFL layout into
    exactly the keys and shapes of ``FluxTransformer2DModel``."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in flux.bfl_specs("full", variant)}
    conv = convert_flux_transformer_checkpoint_to_diffusers(sd)
    ref = {k: tuple(v.shape) for k, v in flux.build_diffusers_transformer("full", variant, "meta").state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conv.items()} == ref


def test_full_size_reference_lists_are_recognised(mecha_layout):
    ref = _mecha_shapes(mecha_layout, "flux-flux")
    info = detect(ref)
    assert (info.architecture, info.variant, info.layout) == ("Flux.1", "dev", "all-in-one")
    assert info.prefixes == {"transformer": "model.diffusion_model.", "vae": "vae.",
                             "text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.t5xxl."}
    groups = split_components(ref, info)
    assert {c: len(v) for c, v in groups.items()} == {"transformer": 780, "vae": 244, "text_encoder": 196,
                                                      "text_encoder_2": 219}
    # each component alone, as the separate files users keep (BFL ae.safetensors, clip_l, t5xxl)
    comps = mecha_layout("flux-flux")
    for comp, prefix, arch, variant in (("vae", "vae.", "VAE", "16-channel"),
                                        ("clip_l", "text_encoders.clip_l.transformer.", "CLIP-L", None),
                                        ("t5xxl", "text_encoders.t5xxl.transformer.", "T5", "XXL")):
        bare = {k[len(prefix):]: tuple(v["shape"]) for k, v in comps[comp].items()}
        i = detect(bare)
        assert (i.architecture, i.variant, i.layout) == (arch, variant, "component"), comp
        assert set(split_components(bare, i)) == {"vae" if comp == "vae" else "text_encoder"}
    # SD3 medium all-in-one (ComfyUI names): named SD3, never merged
    sd3 = detect(_mecha_shapes(mecha_layout, "sd3-comfyui"))
    assert (sd3.architecture, sd3.variant, sd3.layout) == ("SD3", "3-medium", "all-in-one")
    assert any("not supported for merge" in n for n in sd3.notes)
    assert not sd3.is_checkpoint


# ------------------------------------------------------------------------------------------------ files on disk

@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    out = {}
    for layout in LAYOUTS:
        for variant in ("dev", "schnell"):
            out[(layout, variant)] = flux.write(d / f"{layout}-{variant}.safetensors", layout, variant)
    out["fp8-e4m3"] = flux.write(d / "bfl-dev-fp8.safetensors", "bfl", "dev", dtype=torch.float8_e4m3fn)
    for comp in ("vae", "clip_l", "t5xxl"):
        out[comp] = flux.write(d / f"{comp}.safetensors", comp, dtype=torch.float32)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_files_recognised_in_every_layout(flux_files, layout, variant):
    rep = inspect_file(flux_files[(layout, variant)])
    assert (rep["architecture"], rep["variant"], rep["layout"]) == ("Flux.1", variant, layout)
    assert rep["junk"] == []
    n_transformer = rep["components"]["transformer"]["keys"]
    if layout == "diffusers":
        ref = flux.build_diffusers_transformer("tiny", variant, "meta").state_dict()
        assert n_transformer == len(ref)
    else:
        assert n_transformer == (780 if variant == "dev" else 776)
    if layout == "all-in-one":
        assert set(rep["components"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    text = format_report(rep)
    assert f"architecture: Flux.1 ({variant})" in text and f"layout: {layout}" in text


def test_diffusers_model_loads_our_diffusers_file(flux_files):
    """The diffusers-layout file is exactly FluxTransformer2DModel's state dict (strict load)."""
    m = flux.build_diffusers_transformer("tiny", "dev")
    m.load_state_dict(load_state_dict(flux_files[("diffusers", "dev")]), strict=True)


def test_separate_component_files(flux_files):
    vae = inspect_file(flux_files["vae"])
    assert (vae["architecture"], vae["variant"], vae["layout"]) == ("VAE", "16-channel", "component")
    clip = inspect_file(flux_files["clip_l"])
    assert (clip["architecture"], clip["layout"]) == ("CLIP-L", "component")
    t5 = inspect_file(flux_files["t5xxl"])
    assert t5["architecture"] == "T5" and t5["variant"] is None  # tiny width: not named XXL
    for name in ("vae", "clip_l", "t5xxl"):
        assert inspect_file(flux_files[name])["junk"] == []
    # the keys are the real modules' (ldm Encoder/Decoder at z=16; transformers CLIP / T5)
    assert len(flux.build_vae16("tiny").state_dict()) == vae["total_keys"]
    assert "text_model.encoder.layers.11.mlp.fc2.weight" in open_model(flux_files["clip_l"])


def test_flux_cli_json_and_text(flux_files, capsys):
    assert cli.main(["inspect", "--json", str(flux_files[("all-in-one", "schnell")])]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["architecture"], rep["variant"], rep["layout"]) == ("Flux.1", "schnell", "all-in-one")
    assert cli.main(["inspect", str(flux_files[("bfl", "dev")])]) == 0
    assert "Flux.1 (dev)" in capsys.readouterr().out


def test_sd3_diffusers_named():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16)
    info = detect(m.state_dict())
    assert (info.architecture, info.variant, info.layout) == ("SD3", "3-medium", "diffusers")


# ------------------------------------------------------------------------------------------------ never a wrong arch

def _flux_under_unet_prefix(drop=()):
    return {"model.diffusion_model." + k: s for k, s in flux.bfl_specs() if not any(d in k for d in drop)}


def test_flux_transformer_under_the_unet_prefix_is_flux_not_sd1():
    """The regression: a Flux transformer saved under ``model.diffusion_model.`` was called SD1."""
    info = detect(_flux_under_unet_prefix())
    assert (info.architecture, info.variant, info.layout) == ("Flux.1", "dev", "bfl")


@pytest.mark.parametrize("case", ["no-vector_in", "flux2-diffusers", "sd3-under-unet-prefix", "random-unet-prefix"])
def test_unknown_layouts_are_unknown_never_sd(case, mecha_layout):
    if case == "no-vector_in":  # Chroma-like: Flux blocks without the pooled-vector embedder
        shapes = _flux_under_unet_prefix(drop=("vector_in",))
    elif case == "flux2-diffusers":
        from diffusers import Flux2Transformer2DModel

        m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 4, 4, 4))
        shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in m.state_dict().items()}
    elif case == "sd3-under-unet-prefix":  # SD3 transformer keys without its x_embedder (an unknown cut)
        shapes = {k: tuple(v["shape"]) for k, v in mecha_layout("sd3-comfyui")["diffuser"].items()
                  if "x_embedder" not in k}
    else:
        shapes = {"model.diffusion_model.blocks.0.attn.weight": (4, 4), "model.diffusion_model.head.weight": (4,)}
    info = detect(shapes)
    assert info.architecture == "unknown", info


# ------------------------------------------------------------------------------------------------ fp8

@pytest.mark.parametrize("dt", FP8)
def test_fp8_round_trip_matches_torch_casts(tmp_path, dt):
    """On the real ldm VAE (the smallest real layout): read, inspect, prune, content hash, file hash."""
    sd32 = factory.build_state_dict("VAE", seed=3)
    path = factory.write_checkpoint(tmp_path / "m.safetensors", "VAE", dtype=dt, seed=3)
    with open_model(path) as r:
        for k, t in sd32.items():
            got = r.get(k)
            if not t.dtype.is_floating_point:
                assert torch.equal(got, t)
                continue
            assert got.dtype == dt and r.info(k).dtype == dt
            assert torch.equal(got.view(torch.uint8), t.to(dt).view(torch.uint8)), k
    rep = inspect_file(path)
    assert rep["architecture"] == "VAE" and str(dt).replace("torch.", "") in rep["dtypes"]
    # prune: fp8 -> fp16 is torch's own cast; "keep" on a bare fp8 VAE changes nothing, so nothing is written
    # and the fp8 bytes stay where they are (a component taken out of a checkpoint keeps them: bf16 test below)
    out16 = prune_file(path, tmp_path / "p16.safetensors", PruneOptions(dtype="fp16"))
    outk = prune_file(path, tmp_path / "pk.safetensors", PruneOptions(dtype="keep"))
    assert outk.written is False and not (tmp_path / "pk.safetensors").exists()
    src = load_state_dict(path)
    p16 = load_state_dict(out16.output)
    for k, t in src.items():
        if t.dtype == dt:
            assert p16[k].dtype == torch.float16 and torch.equal(p16[k], t.to(torch.float16)), k
    # content hash: every fp8 value is exact in fp16, so the fp8 file and its fp16 cast are the same weights
    a, b = content_hash(path), content_hash(out16.output)
    assert a.hash == b.hash and a.exact == b.exact
    assert len(hash_file(path, ["sha256"]).sha256) == 64


def _cast(sd, dt):
    return {k: v.to(dt) if v.dtype.is_floating_point and not k.endswith("position_ids") else v for k, v in sd.items()}


def test_fp8_merge_is_computed_in_fp32(tmp_path, fixture_files):
    """e4m3 A and e5m2 B (the session's SD1 file cast by torch): the result is the fp32 weighted sum."""
    sd = load_state_dict(fixture_files["sd1"])
    a = save_safetensors(tmp_path / "a.safetensors", _cast(sd, torch.float8_e4m3fn))
    b = save_safetensors(tmp_path / "b.safetensors", _cast({k: -v if v.dtype.is_floating_point else v
                                                             for k, v in sd.items()}, torch.float8_e5m2))
    out = tmp_path / "m.safetensors"
    merge_files(MergeRecipe(str(a), str(b), alpha=0.3, dtype="fp32"), out)
    sa, sb, so = load_state_dict(a), load_state_dict(b), load_state_dict(out)
    for k, ta in sa.items():
        if not ta.dtype.is_floating_point:
            continue
        want = ta.float() * 0.7 + sb[k].float() * 0.3
        assert so[k].dtype == torch.float32
        torch.testing.assert_close(so[k], want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ GGUF

def _gguf(path):
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return path


def test_gguf_refused_clearly_everywhere(tmp_path, fixture_files):
    g = _gguf(tmp_path / "flux1-dev-Q4_K_S.gguf")
    calls = [
        lambda: inspect_file(g),
        lambda: prune_file(g, tmp_path / "o.safetensors"),
        lambda: content_hash(g),
        lambda: merge_files(MergeRecipe(str(g), str(fixture_files["sd1_fp16"]), alpha=0.5),
                            tmp_path / "m.safetensors"),
        lambda: merge_files(MergeRecipe(str(fixture_files["sd1_fp16"]), str(g), alpha=0.5),
                            tmp_path / "m2.safetensors"),
    ]
    for call in calls:
        with pytest.raises(ModelFileError) as e:
            call()
        assert "GGUF files are not supported" in str(e.value) and "flux1-dev-Q4_K_S.gguf" in str(e.value)
    # the magic decides, whatever the suffix says
    disguised = _gguf(tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match="GGUF files are not supported"):
        open_model(disguised)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------------------------------ SDXL markers

VPRED_META = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
              "modelspec.prediction_type": "v", "modelspec.title": "NoobAI-XL V-Pred 1.0",
              "ss_base_model_version": "sdxl_base_v1-0"}


_SDXL_CACHE = {}


def _sdxl(path, seed=0, markers=(), meta=None, extra=None):
    """The session's tiny SDXL (seed 1: its floats negated, another model with the same keys) + markers."""
    base = _SDXL_CACHE["base"]
    sd = dict(base) if seed == 0 else {k: -v if v.dtype.is_floating_point and not k.endswith("position_ids") else v
                                       for k, v in base.items()}
    for m in markers:
        sd[m] = torch.tensor([])  # as NoobAI v-pred ships them: empty float32 tensors
    sd.update(extra or {})
    return save_safetensors(path, sd, meta)


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory, fixture_files):
    _SDXL_CACHE["base"] = load_state_dict(fixture_files["sdxl"])
    d = tmp_path_factory.mktemp("vpred")
    return {
        "vpred": _sdxl(d / "vpred.safetensors", markers=("v_pred", "ztsnr"), meta=VPRED_META),
        "vpred-b": _sdxl(d / "vpred_b.safetensors", seed=1, markers=("v_pred", "ztsnr")),
        "eps": _sdxl(d / "eps.safetensors", seed=1),
        "eps-same": _sdxl(d / "eps_same.safetensors"),
        "meta-only": _sdxl(d / "meta_only.safetensors", meta={"modelspec.prediction_type": "v",
                                                             "ss_sd_model_name": "ponyDiffusionV6XL.safetensors"}),
    }


def test_inspect_reports_prediction_ztsnr_family(sdxl_files, capsys):
    rep = inspect_file(sdxl_files["vpred"])
    assert (rep["architecture"], rep["prediction"], rep["ztsnr"]) == ("SDXL", "v", True)
    assert rep["prediction_source"] == "marker key v_pred" and rep["markers"] == ["v_pred", "ztsnr"]
    assert rep["family"] == "NoobAI" and rep["family_source"].startswith("modelspec.title=")
    assert rep["components"]["marker"]["keys"] == 2 and "v_pred" not in rep["junk"]
    eps = inspect_file(sdxl_files["eps"])
    assert (eps["prediction"], eps["ztsnr"], eps["family"], eps["markers"]) == ("eps", False, None, [])
    meta_only = inspect_file(sdxl_files["meta-only"])
    assert meta_only["prediction"] == "v" and meta_only["family"] == "Pony"
    assert any("no v_pred marker key" in n for n in meta_only["notes"])
    assert cli.main(["inspect", str(sdxl_files["vpred"])]) == 0
    text = capsys.readouterr().out
    assert "prediction: v (marker key v_pred)" in text and "zero terminal SNR: yes" in text
    assert "family: NoobAI" in text


@pytest.mark.parametrize("only", [None, ["unet"]])
def test_prune_keeps_marker_keys(sdxl_files, tmp_path, only):
    res = prune_file(sdxl_files["vpred"], tmp_path / "p.safetensors", PruneOptions(dtype="bf16", only=only))
    with open_model(res.output) as r:
        for m in ("v_pred", "ztsnr"):
            assert m in r and r.info(m).dtype == torch.float32 and r.info(m).shape == (0,)
        assert r.metadata["modelspec.prediction_type"] == "v"
    assert inspect_file(res.output)["prediction"] == "v"
    assert "marker" not in res.dropped


def test_merge_keeps_markers_from_a_never_averaged(sdxl_files, tmp_path):
    """Needs the sdxl_files fixture first (it loads the base weights)."""
    # A v-pred, B eps: the markers come from A
    out = tmp_path / "m.safetensors"
    merge_files(MergeRecipe(str(sdxl_files["vpred"]), str(sdxl_files["eps"]), alpha=0.5, dtype="fp16"), out)
    with open_model(out) as r:
        assert r.info("v_pred").dtype == torch.float32 and r.info("ztsnr").shape == (0,)
    # both v-pred: still A's tensors as stored (not cast to the output dtype)
    out2 = tmp_path / "m2.safetensors"
    merge_files(MergeRecipe(str(sdxl_files["vpred"]), str(sdxl_files["vpred-b"]), alpha=0.5, dtype="fp16"), out2)
    with open_model(out2) as r:
        assert r.info("v_pred").dtype == torch.float32
    # B's markers are not added to an eps A
    out3 = tmp_path / "m3.safetensors"
    merge_files(MergeRecipe(str(sdxl_files["eps"]), str(sdxl_files["vpred"]), alpha=0.5), out3)
    assert "v_pred" not in open_model(out3)
    # EDM markers with values (Playground v2.5 style): A's values, not an average
    ea = _sdxl(tmp_path / "ea.safetensors", extra={"edm_mean": torch.full((1, 4, 1, 1), 0.5),
                                                   "edm_std": torch.full((1, 4, 1, 1), 0.25)})
    eb = _sdxl(tmp_path / "eb.safetensors", seed=1, extra={"edm_mean": torch.full((1, 4, 1, 1), 1.5),
                                                           "edm_std": torch.full((1, 4, 1, 1), 2.0)})
    out4 = tmp_path / "m4.safetensors"
    merge_files(MergeRecipe(str(ea), str(eb), alpha=0.5, dtype="fp16"), out4)
    got = load_state_dict(out4)
    assert torch.equal(got["edm_mean"], torch.full((1, 4, 1, 1), 0.5))
    assert torch.equal(got["edm_std"], torch.full((1, 4, 1, 1), 0.25))


def test_content_hash_tells_vpred_from_its_eps_twin(sdxl_files, tmp_path):
    """Same weights, one with the markers: not duplicates (dedup would otherwise 'deduplicate' the v-pred file
    into a model that renders noise); the v-pred file and its lossless fp32 prune are."""
    v = content_hash(sdxl_files["vpred"])
    assert v.hash != content_hash(sdxl_files["eps-same"]).hash
    pruned = prune_file(sdxl_files["vpred"], tmp_path / "p.safetensors", PruneOptions(dtype="fp32"))
    assert content_hash(pruned.output).hash == v.hash


def test_prune_flux_files(flux_files, tmp_path):
    """The VAE out of an all-in-one file is a bare 16-channel ae file; fp8 -> bf16 is torch's own cast."""
    res = prune_file(flux_files[("all-in-one", "dev")], tmp_path / "ae.safetensors", PruneOptions(only=["vae"]))
    rep = inspect_file(res.output)
    assert (rep["architecture"], rep["variant"]) == ("VAE", "16-channel")
    assert set(open_model(res.output).keys()) == {k for k, _ in flux.component_specs("vae")}
    res = prune_file(flux_files["fp8-e4m3"], tmp_path / "bf16.safetensors", PruneOptions(dtype="bf16"))
    assert (res.architecture, res.dropped) == ("Flux.1", {})
    src, out = load_state_dict(flux_files["fp8-e4m3"]), load_state_dict(res.output)
    assert src.keys() == out.keys()
    for k, t in src.items():
        assert t.dtype == torch.float8_e4m3fn and torch.equal(out[k], t.to(torch.bfloat16)), k
    t = prune_file(flux_files[("all-in-one", "schnell")], tmp_path / "t.safetensors",
                   PruneOptions(dtype="keep", only=["transformer"]))
    assert inspect_file(t.output)["layout"] == "bfl" and t.kept == {"transformer": 776}


@pytest.mark.parametrize("blocks,attn2,variant", [(24, False, "3-medium"), (24, True, "3.5-medium"),
                                                  (38, False, "3.5-large")])
def test_sd3_variants_by_structure(mecha_layout, blocks, attn2, variant):
    """SD3 medium's real key list, re-blocked: 38 joint blocks is 3.5 large, MMDiT-X's attn2 is 3.5 medium."""
    ref = {k: tuple(v["shape"]) for k, v in mecha_layout("sd3-comfyui")["diffuser"].items()}
    block0 = {k: s for k, s in ref.items() if k.startswith("model.diffusion_model.joint_blocks.0.")}
    shapes = {k: s for k, s in ref.items() if ".joint_blocks." not in k}
    for i in range(blocks):
        for k, s in block0.items():
            shapes[k.replace(".joint_blocks.0.", f".joint_blocks.{i}.")] = s
        if attn2:
            shapes[f"model.diffusion_model.joint_blocks.{i}.x_block.attn2.qkv.weight"] = (4, 4)
    info = detect(shapes)
    assert (info.architecture, info.variant, info.layout) == ("SD3", variant, "bfl")
