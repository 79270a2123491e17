"""Flux.1 LoRA in every naming, checked against diffusers loading the same file (#13 item 3), and lora convert
(#14 item 4) round trips for SD1, SDXL and Flux.

The reference model: diffusers' ``FluxTransformer2DModel`` at tiny width with Flux.1's depths. The BFL checkpoint
is turned into that model's state dict with the row map *diffusers' own converter* gives
(``convert_flux_transformer_checkpoint_to_diffusers``, which hard-codes width 3072: it is run at full width on
tensors of one column whose values say which BFL key and row they came from, and the map read back in fractions of
each key's rows). Our bake onto the BFL checkpoint, converted that way, must give the same forward pass as diffusers
applying the LoRA file itself (``FluxPipeline.lora_state_dict`` + ``load_lora_into_transformer``: its kohya, XLabs
and PEFT paths).
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from lib_sdtoolkit.files import load_state_dict, save_safetensors
from lib_sdtoolkit.samples import flux

H = 32  # tiny hidden width
R = 4


# ----------------------------------------------------------------------------------- the diffusers reference
@pytest.fixture(scope="module")
def row_map():
    """diffusers key -> [(BFL key, first row fraction, end row fraction)], from diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    specs = flux.bfl_specs("full", "dev")
    names = [k for k, _ in specs]
    rows = {k: s[0] for k, s in specs}
    ref = {k: (torch.arange(s[0], dtype=torch.float64) + i * 2 ** 20).reshape(s[0], 1)
           for i, (k, s) in enumerate(specs)}
    out = {}
    for dk, v in convert_flux_transformer_checkpoint_to_diffusers(ref).items():
        v = v.reshape(-1).long()
        src, row = v >> 20, v & (2 ** 20 - 1)
        brk = ((src[1:] != src[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().reshape(-1) + 1
        starts = [0] + brk.tolist()
        ends = brk.tolist() + [len(v)]
        segs = []
        for a, b in zip(starts, ends):
            k = names[int(src[a])]
            segs.append((k, Fraction(int(row[a]), rows[k]), Fraction(int(row[b - 1]) + 1, rows[k])))
        out[dk] = segs
    return out


def to_diffusers(sd, row_map, prefix=""):
    out = {}
    for dk, segs in row_map.items():
        parts = []
        for k, a, b in segs:
            t = sd[prefix + k]
            n = t.shape[0]
            assert (a * n).denominator == 1 and (b * n).denominator == 1
            parts.append(t[int(a * n):int(b * n)])
        out[dk] = torch.cat(parts, 0)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Flux.1 dev in fp32: the BFL state dict and its files in the BFL, diffusers and all-in-one layouts."""
    d = tmp_path_factory.mktemp("fluxlora")
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * (0.2 if len(s) > 1 else 0.05) + (1.0 if k.endswith("scale") else 0.0)
          for k, s in flux.bfl_specs("tiny", "dev")}
    p = d / "flux-bfl.safetensors"
    save_safetensors(p, sd)
    return {"dir": d, "sd": sd, "bfl": p}


def _model(sd_diffusers):
    m = flux.build_diffusers_transformer("tiny", "dev")
    m.load_state_dict(sd_diffusers, strict=True)
    return m.float().eval()


def _forward(m):
    """One forward pass on one thread: at this width two threads on a busy 2-core machine are 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _forward1(m)
    finally:
        torch.set_num_threads(threads)


def _forward1(m):
    g = torch.Generator().manual_seed(3)
    n_img, n_txt = 8, 5
    with torch.no_grad():
        return m(hidden_states=torch.randn(1, n_img, 64, generator=g),
                 encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                 pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                 img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(n_txt, 3),
                 guidance=torch.tensor([3.5]), return_dict=False)[0]


def _diffusers_reference(base_sd, lora_path, row_map):
    from diffusers import FluxPipeline

    m = _model(to_diffusers(base_sd, row_map))
    state, alphas = FluxPipeline.lora_state_dict(str(lora_path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=m)
    return _forward(m)


def _ours(base, lora_path, row_map, tmp_path):
    from lib_sdtoolkit.lora.bake import bake

    out = tmp_path / f"baked-{Path(lora_path).stem}.safetensors"
    bake(base["bfl"], [(lora_path, 1.0)], out)
    return _forward(_model(to_diffusers(load_state_dict(out), row_map)))


def _lora(g, out_dim, in_dim, scale=0.3):
    return torch.randn(R, in_dim, generator=g) * scale, torch.randn(out_dim, R, generator=g) * scale


def _check(ours, ref, plain):
    assert not torch.allclose(plain, ref, atol=1e-3), "the LoRA must change the output for the test to mean anything"
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), float((ours - ref).abs().max())


def kohya_file(path, blocks=(0, 7, 18), singles=(0, 37), linear1=False, seed=5, top=True):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, o, i, alpha=2.0):
        dn, up = _lora(g, o, i)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = dn, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for b in blocks:
        for s in ("img", "txt"):
            add(f"lora_unet_double_blocks_{b}_{s}_attn_qkv", 3 * H, H)
            add(f"lora_unet_double_blocks_{b}_{s}_attn_proj", H, H)
            add(f"lora_unet_double_blocks_{b}_{s}_mlp_0", 4 * H, H)
            add(f"lora_unet_double_blocks_{b}_{s}_mlp_2", H, 4 * H)
            add(f"lora_unet_double_blocks_{b}_{s}_mod_lin", 6 * H, H)
    for b in singles:
        if linear1:
            add(f"lora_unet_single_blocks_{b}_linear1", 7 * H, H)
        add(f"lora_unet_single_blocks_{b}_linear2", H, 5 * H)
        add(f"lora_unet_single_blocks_{b}_modulation_lin", 3 * H, H)
    if top:
        add("lora_unet_img_in", H, 64)
        add("lora_unet_time_in_in_layer", H, 256)
        add("lora_unet_guidance_in_out_layer", H, H)
        add("lora_unet_final_layer_adaLN_modulation_1", 2 * H, H)
        add("lora_unet_final_layer_linear", 64, H, alpha=4.0)
    save_safetensors(path, sd)
    return sd


def diffusers_file(path, prefix="transformer.", seed=6):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, o, i, alpha=3.0):
        dn, up = _lora(g, o, i)
        sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = dn, up
        sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)

    for b in (1, 18):
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            add(f"transformer_blocks.{b}.attn.{m}", H, H)
        add(f"transformer_blocks.{b}.ff.net.0.proj", 4 * H, H)
        add(f"transformer_blocks.{b}.ff_context.net.2", H, 4 * H)
        add(f"transformer_blocks.{b}.norm1.linear", 6 * H, H)
        add(f"transformer_blocks.{b}.norm1_context.linear", 6 * H, H)
    for b in (2, 30):
        for m in ("attn.to_q", "attn.to_k", "attn.to_v"):
            add(f"single_transformer_blocks.{b}.{m}", H, H)
        add(f"single_transformer_blocks.{b}.proj_mlp", 4 * H, H)
        add(f"single_transformer_blocks.{b}.proj_out", H, 5 * H)
        add(f"single_transformer_blocks.{b}.norm.linear", 3 * H, H)
    add("norm_out.linear", 2 * H, H)
    add("proj_out", 64, H)
    add("x_embedder", H, 64)
    add("context_embedder", H, 32)
    add("time_text_embed.guidance_embedder.linear_1", H, 256)
    save_safetensors(path, sd)
    return sd


def xlabs_file(path, seed=7):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in (0, 4):
        for name, o in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            dn, up = _lora(g, o, H)
            sd[f"double_blocks.{b}.processor.{name}.down.weight"] = dn
            sd[f"double_blocks.{b}.processor.{name}.up.weight"] = up
    dn, up = _lora(g, 3 * H, H)
    sd["single_blocks.3.processor.qkv_lora.down.weight"], sd["single_blocks.3.processor.qkv_lora.up.weight"] = dn, up
    save_safetensors(path, sd)
    return sd


@pytest.mark.parametrize("naming", ["kohya", "diffusers", "xlabs"])
def test_bake_equals_diffusers_loading_the_same_file(base, row_map, tmp_path, naming):
    """Forward equality: diffusers applies the file to the converted base; we bake it into the BFL base.

    The kohya file leaves out the layers outside the blocks (``img_in``, ``time_in``, ``final_layer``...):
    diffusers 0.39's kohya converter emits them without the ``transformer.`` prefix, so its transformer loader
    drops them (and it ignores the final layer's alpha). The diffusers-named file covers those layers
    (``x_embedder``, ``norm_out.linear`` with its swapped halves, ``proj_out``, the guidance embedder)."""
    lora = tmp_path / f"{naming}.safetensors"
    if naming == "kohya":
        kohya_file(lora, top=False)
    else:
        {"diffusers": diffusers_file, "xlabs": xlabs_file}[naming](lora)
    plain = _forward(_model(to_diffusers(base["sd"], row_map)))
    ref = _diffusers_reference(base["sd"], lora, row_map)
    _check(_ours(base, lora, row_map, tmp_path), ref, plain)


def _renamed(sd, fn):
    return {fn(k): v for k, v in sd.items()}


def test_other_namings_bake_bit_equal(base, tmp_path):
    """BFL/ComfyUI names (``diffusion_model.double_blocks...lora_A``) are kohya's modules renamed; PEFT's are
    diffusers' under ``base_model.model.``; a kohya ``linear1`` equals its diffusers split (shared down, up rows
    q|k|v|mlp, which diffusers checks above): each bakes to the same bits as its twin."""
    import re

    from lib_sdtoolkit.lora.bake import bake

    k = kohya_file(tmp_path / "k.safetensors", linear1=True)

    def comfy(key):
        mod, part = key.split(".", 1)
        mod = mod[len("lora_unet_"):]
        for a, b in (("double_blocks_", "double_blocks."), ("single_blocks_", "single_blocks.")):
            if mod.startswith(a):
                n, rest = mod[len(a):].split("_", 1)
                mod = f"{b}{n}.{rest.replace('_attn_', '_attn.').replace('_mlp_', '_mlp.').replace('_mod_lin', '_mod.lin').replace('modulation_lin', 'modulation.lin')}"
                break
        else:
            mod = {"img_in": "img_in", "time_in_in_layer": "time_in.in_layer",
                   "guidance_in_out_layer": "guidance_in.out_layer",
                   "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
                   "final_layer_linear": "final_layer.linear"}[mod]
        part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        return f"diffusion_model.{mod}.{part}"

    save_safetensors(tmp_path / "c.safetensors", _renamed(k, comfy))
    d = diffusers_file(tmp_path / "d.safetensors")
    save_safetensors(tmp_path / "p.safetensors", _renamed(d, lambda s: "base_model.model." + s))
    # kohya linear1 vs its diffusers split
    split = {}
    for key, v in k.items():
        m = re.match(r"lora_unet_single_blocks_(\d+)_linear1\.(.*)$", key)
        if not m:
            continue
        b, part = m.groups()
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        bounds = (0, H, 2 * H, 3 * H, 7 * H)
        for j, nm in enumerate(names):
            base_name = f"transformer.single_transformer_blocks.{b}.{nm}"
            if part == "lora_up.weight":
                split[f"{base_name}.lora_B.weight"] = v[bounds[j]:bounds[j + 1]].clone()
            elif part == "lora_down.weight":
                split[f"{base_name}.lora_A.weight"] = v.clone()
            else:
                split[f"{base_name}.alpha"] = v.clone()
    save_safetensors(tmp_path / "l1.safetensors", split)
    only = {key: v for key, v in k.items() if "_linear1." in key}
    save_safetensors(tmp_path / "l1k.safetensors", only)

    outs = {}
    for name in ("k", "c", "d", "p", "l1", "l1k"):
        outs[name] = load_state_dict(bake(base["bfl"], [(tmp_path / f"{name}.safetensors", 0.8)],
                                          tmp_path / f"o-{name}.safetensors")["output"])
    for a, b in (("k", "c"), ("d", "p"), ("l1", "l1k")):
        assert outs[a].keys() == outs[b].keys()
        changed = [x for x in outs[a] if not torch.equal(outs[a][x], base["sd"][x])]
        assert changed, a
        assert all(torch.equal(outs[a][x], outs[b][x]) for x in outs[a]), (a, b)


def test_lokr_loha_on_fused_weights_equal_plain_torch(base, tmp_path):
    """LyCORIS types on Flux: a LoKr on ``img_attn.qkv`` and a LoHa on ``linear2`` (kohya names) against
    W + scale·kron(w1, w2) and W + scale·(a1 b1)⊙(a2 b2) computed here."""
    from lib_sdtoolkit.lora.bake import bake

    g = torch.Generator().manual_seed(11)
    w1, w2a, w2b = torch.randn(3, 1, generator=g), torch.randn(H, 2, generator=g), torch.randn(2, H, generator=g)
    a1, b1 = torch.randn(H, 2, generator=g), torch.randn(2, 5 * H, generator=g)
    a2, b2 = torch.randn(H, 2, generator=g), torch.randn(2, 5 * H, generator=g)
    sd = {"lora_unet_double_blocks_3_img_attn_qkv.lokr_w1": w1, "lora_unet_double_blocks_3_img_attn_qkv.lokr_w2_a": w2a,
          "lora_unet_double_blocks_3_img_attn_qkv.lokr_w2_b": w2b,
          "lora_unet_double_blocks_3_img_attn_qkv.alpha": torch.tensor(1.0),
          "lora_unet_single_blocks_9_linear2.hada_w1_a": a1, "lora_unet_single_blocks_9_linear2.hada_w1_b": b1,
          "lora_unet_single_blocks_9_linear2.hada_w2_a": a2, "lora_unet_single_blocks_9_linear2.hada_w2_b": b2,
          "lora_unet_single_blocks_9_linear2.alpha": torch.tensor(1.0)}
    save_safetensors(tmp_path / "ly.safetensors", sd)
    out = load_state_dict(bake(base["bfl"], [(tmp_path / "ly.safetensors", 1.0)], tmp_path / "ly-o.safetensors")["output"])
    exp_q = base["sd"]["double_blocks.3.img_attn.qkv.weight"] + 0.5 * torch.kron(w1, w2a @ w2b)
    exp_2 = base["sd"]["single_blocks.9.linear2.weight"] + 0.5 * ((a1 @ b1) * (a2 @ b2))
    assert torch.allclose(out["double_blocks.3.img_attn.qkv.weight"], exp_q, atol=1e-5)
    assert torch.allclose(out["single_blocks.9.linear2.weight"], exp_2, atol=1e-5)


def test_bake_onto_every_layout(base, row_map, tmp_path):
    """The same LoRA baked onto the diffusers-layout file equals the BFL bake converted (bit for bit: ΔW of a fused
    layer is computed once and split), and onto an all-in-one file (``model.diffusion_model.`` + CLIP-L under
    ``text_encoders.clip_l.transformer.``) it patches the transformer the same and the CLIP-L q_proj by plain torch."""
    from lib_sdtoolkit.lora.bake import bake

    k = kohya_file(tmp_path / "k.safetensors", linear1=True)
    g = torch.Generator().manual_seed(2)
    dn, up = torch.randn(R, 32, generator=g), torch.randn(32, R, generator=g)
    k.update({"lora_te1_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight": dn,
              "lora_te1_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight": up})
    save_safetensors(tmp_path / "kt.safetensors", k)
    bfl = load_state_dict(bake(base["bfl"], [(tmp_path / "kt.safetensors", 0.7)], tmp_path / "b1.safetensors")["output"])
    dif_in = tmp_path / "dif.safetensors"
    save_safetensors(dif_in, to_diffusers(base["sd"], row_map))
    dif = load_state_dict(bake(dif_in, [(tmp_path / "kt.safetensors", 0.7)], tmp_path / "b2.safetensors")["output"])
    ref = to_diffusers(bfl, row_map)
    assert dif.keys() == ref.keys()
    assert all(torch.equal(dif[x], ref[x]) for x in ref)

    clip = {k2: torch.randn(s, generator=g) * 0.1 for k2, s in flux.component_specs("clip_l")}
    aio = {"model.diffusion_model." + k2: v for k2, v in base["sd"].items()}
    aio.update({"text_encoders.clip_l.transformer." + k2: v for k2, v in clip.items()})
    save_safetensors(tmp_path / "aio.safetensors", aio)
    out = load_state_dict(bake(tmp_path / "aio.safetensors", [(tmp_path / "kt.safetensors", 0.7)],
                               tmp_path / "b3.safetensors")["output"])
    for k2 in base["sd"]:
        assert torch.equal(out["model.diffusion_model." + k2], bfl[k2])
    q = "text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
    assert torch.allclose(out[q], clip[q[len("text_encoders.clip_l.transformer."):]] + 0.7 * (up @ dn), atol=1e-6)


def test_fp8_lora_and_checkpoint_read(base, tmp_path):
    """float8_e4m3fn factors and an fp8 checkpoint: ΔW from the factors upcast as torch does, W' = fp8(W + ΔW)."""
    from lib_sdtoolkit.lora.bake import bake

    k = kohya_file(tmp_path / "k.safetensors", blocks=(2,), singles=(), seed=9)
    k8 = {x: (v.to(torch.float8_e4m3fn) if v.dim() else v) for x, v in k.items()}
    save_safetensors(tmp_path / "k8.safetensors", k8)
    b8 = {x: v.to(torch.float8_e4m3fn) for x, v in base["sd"].items()}
    save_safetensors(tmp_path / "b8.safetensors", b8)
    out = load_state_dict(bake(tmp_path / "b8.safetensors", [(tmp_path / "k8.safetensors", 1.0)],
                               tmp_path / "o8.safetensors")["output"])
    key = "double_blocks.2.img_attn.qkv.weight"
    n = "lora_unet_double_blocks_2_img_attn_qkv"
    delta = k8[f"{n}.lora_up.weight"].float() @ k8[f"{n}.lora_down.weight"].float() * (2.0 / R)
    exp = (b8[key].float() + delta).to(torch.float8_e4m3fn)
    assert out[key].dtype == torch.float8_e4m3fn
    assert torch.equal(out[key].view(torch.uint8), exp.view(torch.uint8))
    untouched = "single_blocks.0.linear1.weight"
    assert torch.equal(out[untouched].view(torch.uint8), b8[untouched].view(torch.uint8))


def test_inspect_names_format_and_unmatched(tmp_path):
    from lib_sdtoolkit.lora.detect import describe
    from lib_sdtoolkit.lora.inspect_lora import inspect_lora

    xl = xlabs_file(tmp_path / "x.safetensors")
    xl["single_blocks.3.processor.proj_lora.down.weight"] = torch.zeros(R, H)
    xl["single_blocks.3.processor.proj_lora.up.weight"] = torch.zeros(H, R)
    xl["double_blocks.0.processor.bogus_lora1.down.weight"] = torch.zeros(R, H)
    save_safetensors(tmp_path / "x2.safetensors", xl)
    d = describe(tmp_path / "x2.safetensors")
    assert d["arch"] == "Flux.1" and d["naming"] == "xlabs"
    reasons = {u["module"]: u["reason"] for u in d["unmatched"]}
    assert "output" in reasons["single_blocks.3.processor.proj_lora"]
    assert any("bogus" in m for m in reasons)
    info = inspect_lora(tmp_path / "x2.safetensors")
    assert info["naming"] == "xlabs" and info["base_model"] == "Flux.1"
    assert info["targets"] == {"transformer": 9}
    for fn, naming in ((kohya_file, "kohya"), (diffusers_file, "diffusers")):
        fn(tmp_path / f"{naming}.safetensors")
        assert describe(tmp_path / f"{naming}.safetensors")["naming"] == naming
        assert describe(tmp_path / f"{naming}.safetensors")["unmatched"] == []


# --------------------------------------------------------------------------------------------------- convert
NAMINGS = ("kohya", "diffusers", "peft", "comfy")


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _round_trips(src, tmp_path):
    from lib_sdtoolkit.lora.convert import convert

    orig = load_state_dict(src)
    first = convert(src, tmp_path / "src-kohya.safetensors", "kohya")["source_naming"]
    for to in NAMINGS:
        mid = tmp_path / f"mid-{to}.safetensors"
        convert(src, mid, to)
        back = tmp_path / f"back-{to}.safetensors"
        assert convert(mid, back, first)["source_naming"] == to
        assert _same(load_state_dict(back), orig), (first, to)
    return first


@pytest.mark.parametrize("make", ["kohya", "diffusers"])
def test_convert_flux_round_trips_bit_exact(tmp_path, make):
    """Flux kohya (fused qkv / linear1) -> every naming -> back, and diffusers (separate q/k/v with their own
    downs) -> every naming -> back: the same keys, dtypes and bits."""
    if make == "kohya":
        sd = kohya_file(tmp_path / "in.safetensors", linear1=True)
        sd = {k: (v.to(torch.bfloat16) if v.dim() else v) for k, v in sd.items()}
        save_safetensors(tmp_path / "in.safetensors", sd, overwrite=True)
    else:
        diffusers_file(tmp_path / "in.safetensors")
    assert _round_trips(tmp_path / "in.safetensors", tmp_path) == make


def test_convert_flux_keeps_the_network(base, tmp_path):
    """Converted files bake to the same checkpoint (fused <-> split changes names, never the ΔW)."""
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.convert import convert

    diffusers_file(tmp_path / "d.safetensors")
    ref = load_state_dict(bake(base["bfl"], [(tmp_path / "d.safetensors", 1.0)], tmp_path / "o.safetensors")["output"])
    convert(tmp_path / "d.safetensors", tmp_path / "dk.safetensors", "kohya")
    sd = load_state_dict(tmp_path / "dk.safetensors")
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight" in sd
    assert sd["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"].shape == (3 * H, 3 * R)
    out = load_state_dict(bake(base["bfl"], [(tmp_path / "dk.safetensors", 1.0)], tmp_path / "o2.safetensors")["output"])
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-6), k


def _sd_kohya_file(path, arch, seed=0):
    """A kohya LoRA over every UNet and text-encoder target of ``arch`` (plus LoHa / LoKr / norm modules)."""
    from lib_sdtoolkit.arch import keymaps
    from lib_sdtoolkit.lora.extract import _targets

    layout = keymaps.load_layout(arch)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, t) in enumerate(_targets(arch)[::3]):  # every third target: UNet, text encoders, convs all in
        shape = layout[t.weight_key]
        out_dim = shape[0] // 3 if t.qkv_index is not None else shape[0]
        in_dim = int(torch.tensor(shape[1:]).prod())
        if i % 7 == 3:
            sd[f"{name}.hada_w1_a"] = torch.randn(out_dim, 2, generator=g).half()
            sd[f"{name}.hada_w1_b"] = torch.randn(2, in_dim, generator=g).half()
            sd[f"{name}.hada_w2_a"] = torch.randn(out_dim, 2, generator=g).half()
            sd[f"{name}.hada_w2_b"] = torch.randn(2, in_dim, generator=g).half()
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=g).half()
            sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, 2, *([1] * (len(shape) - 2)), generator=g).half()
        sd[f"{name}.alpha"] = torch.tensor(1.0).half()
    save_safetensors(path, sd, {"ss_base_model_version": "sdxl_base_v1-0" if arch == "SDXL" else "sd_v1"})
    return sd


@pytest.mark.parametrize("arch", ["SD1", "SDXL"])
def test_convert_sd_round_trips_bit_exact(tmp_path, arch):
    from lib_sdtoolkit.lora.bake import bake  # noqa: F401 - same import path as the faces
    from lib_sdtoolkit.lora.convert import convert

    src = tmp_path / "in.safetensors"
    _sd_kohya_file(src, arch)
    assert _round_trips(src, tmp_path) == "kohya"
    d = load_state_dict(tmp_path / "mid-diffusers.safetensors")
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in d)
    c = load_state_dict(tmp_path / "mid-comfy.safetensors")
    assert any(k.startswith("diffusion_model.") for k in c) and any(k.startswith("text_encoders.clip_l.") for k in c)
    meta_src = json.loads(__import__("safetensors").safe_open(str(tmp_path / "mid-peft.safetensors"), "pt")
                          .metadata()["sdtoolkit_lora_convert"])
    assert meta_src == {"from": "kohya", "to": "peft", "source": "in.safetensors"}


def test_convert_refuses_what_it_would_drop(tmp_path):
    from lib_sdtoolkit.errors import InvalidInputError
    from lib_sdtoolkit.lora.convert import convert

    sd = kohya_file(tmp_path / "k.safetensors", blocks=(0,), singles=())
    sd["lora_unet_double_blocks_0_no_such_layer.lora_down.weight"] = torch.zeros(R, H)
    sd["lora_unet_double_blocks_0_no_such_layer.lora_up.weight"] = torch.zeros(H, R)
    save_safetensors(tmp_path / "bad.safetensors", sd)
    with pytest.raises(InvalidInputError, match="no_such_layer"):
        convert(tmp_path / "bad.safetensors", tmp_path / "o.safetensors", "diffusers")
    assert not (tmp_path / "o.safetensors").exists()
    ly = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(3, 1),
          "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(H, H)}
    save_safetensors(tmp_path / "ly.safetensors", ly)
    with pytest.raises(InvalidInputError, match="fused"):
        convert(tmp_path / "ly.safetensors", tmp_path / "o.safetensors", "diffusers")
    convert(tmp_path / "ly.safetensors", tmp_path / "o.safetensors", "comfy")  # same module layout: fine


def test_convert_faces_agree(tmp_path, capsys):
    """CLI, API route and the Convert panel write byte-identical files and the same report."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit import cli
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router
    from lib_sdtoolkit.ui.lora_convert_panel import run_convert

    root = tmp_path / "models"
    (root / "Lora").mkdir(parents=True)
    (root / "Stable-diffusion").mkdir()
    kohya_file(root / "Lora" / "fluxk.safetensors", blocks=(0,), singles=(1,), linear1=True)
    assert cli.main(["lora", "convert", str(root / "Lora" / "fluxk.safetensors"), "--to", "diffusers",
                     "-o", str(tmp_path / "cli.safetensors"), "--json"]) in (0, None)
    cli_report = json.loads(capsys.readouterr().out)
    host = StandaloneHost(models_dir=root)
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    client = TestClient(app)
    r = client.post("/sdtoolkit/v1/lora/convert", json={"lora": "fluxk", "to": "diffusers", "output": "api"})
    assert r.status_code == 200, r.text
    assert client.post("/sdtoolkit/v1/lora/convert",
                       json={"lora": "fluxk", "to": "diffusers", "output": "x", "bogus": 1}).status_code == 422
    assert client.post("/sdtoolkit/v1/lora/convert",
                       json={"lora": "../fluxk", "to": "diffusers", "output": "x"}).status_code == 403
    assert client.post("/sdtoolkit/v1/lora/convert",
                       json={"lora": "nope", "to": "diffusers", "output": "x"}).status_code == 404
    status, rep = run_convert(host, {"lora": "fluxk", "to": "diffusers", "output": "ui.safetensors",
                                     "overwrite": False})
    assert rep is not None, status
    data = (tmp_path / "cli.safetensors").read_bytes()
    assert (root / "Lora" / "api.safetensors").read_bytes() == data
    assert (root / "Lora" / "ui.safetensors").read_bytes() == data
    for k in ("arch", "source_naming", "naming", "modules_in", "modules_out", "tensors"):
        assert cli_report[k] == r.json()[k] == rep[k]


def test_extract_from_two_flux_checkpoints(base, row_map, tmp_path):
    """tuned = base + an exactly rank-2 ΔW on a fused ``qkv``, on ``linear1``, on the final modulation and on a
    plain layer: extracting at rank 4 (no clamp, fp32) gives one kohya module per fused weight, and baking it onto
    the base gives the tuned weights back; from the diffusers-layout pair the same factors come out (the pieces are
    stacked back into the BFL module before the SVD)."""
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.extract import extract_lora

    g = torch.Generator().manual_seed(21)
    tuned = dict(base["sd"])
    changed = ["double_blocks.4.img_attn.qkv.weight", "single_blocks.11.linear1.weight",
               "final_layer.adaLN_modulation.1.weight", "double_blocks.4.txt_mlp.2.weight"]
    for k in changed:
        o, i = tuned[k].shape
        tuned[k] = tuned[k] + (torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)) * 0.1
    save_safetensors(tmp_path / "tuned.safetensors", tuned)
    out = extract_lora(tmp_path / "tuned.safetensors", base["bfl"], tmp_path / "x.safetensors", rank=4,
                       clamp_quantile=None, dtype="fp32")
    assert out["arch"] == "Flux.1" and out["layers"] == 4
    x = load_state_dict(tmp_path / "x.safetensors")
    assert x["lora_unet_double_blocks_4_img_attn_qkv.lora_up.weight"].shape == (3 * H, 4)
    assert x["lora_unet_single_blocks_11_linear1.lora_up.weight"].shape == (7 * H, 4)
    baked = load_state_dict(bake(base["bfl"], [(tmp_path / "x.safetensors", 1.0)], tmp_path / "b.safetensors")["output"])
    for k in tuned:
        assert torch.allclose(baked[k], tuned[k], atol=1e-5), k

    save_safetensors(tmp_path / "tuned-d.safetensors", to_diffusers(tuned, row_map))
    save_safetensors(tmp_path / "base-d.safetensors", to_diffusers(base["sd"], row_map))
    extract_lora(tmp_path / "tuned-d.safetensors", tmp_path / "base-d.safetensors", tmp_path / "xd.safetensors",
                 rank=4, clamp_quantile=None, dtype="fp32")
    xd = load_state_dict(tmp_path / "xd.safetensors")
    assert xd.keys() == x.keys()
    assert all(torch.equal(xd[k], x[k]) for k in x)


def test_sd1_convert_to_diffusers_loads_in_diffusers(tmp_path):
    """diffusers applies our ``--to diffusers`` SD1 file (its ``lora_adapter_metadata`` carrying rank and alpha per
    module, both varying) as W + alpha/rank · up @ down computed here in plain torch. (diffusers ignores ``.alpha``
    keys in its own naming, hence the metadata; its kohya path, on this file, gave every module alpha 1 in 0.39.)"""
    from diffusers import StableDiffusionPipeline

    from lib_sdtoolkit.arch import keymaps
    from lib_sdtoolkit.lora.convert import convert
    from lib_sdtoolkit.samples.factory import build_diffusers_unet

    unet = build_diffusers_unet("SD1").eval()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    sd, fused = {}, dict(base)
    names = [n for n in keymaps.kohya_lora_names("SD1")
             if n.startswith("lora_unet_down_blocks") and ("attn1_to" in n or "attn2_to_q" in n or "proj_in" in n)]
    for i, n in enumerate(sorted(names)):
        wk = next(k for k in base if k.replace(".", "_") == n[len("lora_unet_"):] + "_weight")
        s = base[wk].shape
        r, alpha = 2 + i % 3, float(1 + i % 4)
        dn = torch.randn(r, *s[1:], generator=g) * 0.3
        up = torch.randn(s[0], r, *([1] * (len(s) - 2)), generator=g) * 0.3
        sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], sd[f"{n}.alpha"] = dn, up, torch.tensor(alpha)
        fused[wk] = base[wk] + (alpha / r) * (up.reshape(s[0], r) @ dn.reshape(r, -1)).reshape(s)
    src = save_safetensors(tmp_path / "k.safetensors", sd)
    convert(src, tmp_path / "d.safetensors", "diffusers")

    def run(u):
        gg = torch.Generator().manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return u(torch.randn(1, u.config.in_channels, 16, 16, generator=gg), torch.tensor([10]),
                         encoder_hidden_states=torch.randn(1, 7, u.config.cross_attention_dim, generator=gg)).sample
        finally:
            torch.set_num_threads(threads)

    plain = run(unet)
    unet.load_state_dict(fused)
    ref = run(unet)
    unet.load_state_dict(base)
    state, alphas, md = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "d.safetensors"),
                                                                return_lora_metadata=True)
    assert md["unet.alpha_pattern"] and md["unet.rank_pattern"]
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=md)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(run(unet), ref, rtol=1e-4, atol=2e-5)


def test_convert_partial_pieces_round_trip(tmp_path):
    """A diffusers file that trains only ``to_q`` of a double block and ``proj_mlp`` of a single block: kohya holds
    them zero-padded in the fused module, and back in diffusers naming only those two modules come out, bit-exact."""
    from lib_sdtoolkit.lora.convert import convert

    g = torch.Generator().manual_seed(0)
    p = "transformer."
    sd = {p + "transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(R, H, generator=g),
          p + "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, R, generator=g),
          p + "single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(3, H, generator=g),
          p + "single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(4 * H, 3, generator=g)}
    save_safetensors(tmp_path / "p.safetensors", sd)
    convert(tmp_path / "p.safetensors", tmp_path / "pk.safetensors", "kohya")
    k = load_state_dict(tmp_path / "pk.safetensors")
    assert k["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * H, 3)
    assert not k["lora_unet_single_blocks_0_linear1.lora_up.weight"][:3 * H].any()
    convert(tmp_path / "pk.safetensors", tmp_path / "pkd.safetensors", "diffusers")
    assert _same(load_state_dict(tmp_path / "pkd.safetensors"), sd)
