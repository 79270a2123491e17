"""Flux control LoRAs (BFL's FLUX.1 Canny/Depth dev LoRAs, #13 item 3) baked onto a Flux.1 dev checkpoint, against
diffusers' Flux Control loader applying the same file to the same tiny transformer.

A BFL control LoRA has, beside ``lora_A``/``lora_B`` on every Linear layer, ``lora_B.bias`` (a Δbias), the
qk-norms' new ``scale`` (set, not added) and an ``img_in`` LoRA with 128 input channels where the checkpoint's
``img_in`` takes 64: the loader widens ``img_in`` with zero columns (diffusers'
``_maybe_expand_transformer_param_shape_or_error_``, ComfyUI's ``reshape_weight``) and the result is a Canny/Depth
model that takes the packed control image beside the packed latent.

The reference: diffusers' ``_convert_bfl_flux_control_lora_to_diffusers`` hard-codes Flux's full width (3072), so
it runs at full width on tensors of one column whose values say which BFL key and row they came from, and the key
and row map it gives is read back in fractions of each key's rows (as ``test_lora_flux.row_map`` does for the
checkpoint converter). Our tiny file, renamed by that map, goes through ``FluxControlPipeline.load_lora_weights``
(widening, norm loading, PEFT's bias on lora_B); our bake of the BFL file must give the same forward pass.

diffusers' converter (0.39) swaps the halves of ``final_layer.adaLN_modulation.1``'s ``lora_A`` too, not only of
``lora_B``: ΔW's rows need swapping (BFL shift|scale, diffusers scale|shift), and swap(B)·swap_r(A) ≠ swap(B)·A.
ComfyUI applies the file on BFL names and has no such step. The test file's A there has equal halves, so that the
reference is right; :func:`test_control_lora_bake_in_plain_torch` checks our rule on every key.
"""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from lib_sdtoolkit.arch import fluxmaps
from lib_sdtoolkit.errors import SdToolkitError
from lib_sdtoolkit.files import load_state_dict, save_safetensors
from lib_sdtoolkit.samples import flux

from test_lora_flux import H, _model, base, row_map, to_diffusers  # noqa: F401 - fixtures

R = 4
CIN = 128   # the control LoRA's img_in input channels: packed latent (64) + packed control image (64)


def _shapes(width):
    return dict(flux.bfl_specs(width, "dev"))


def _modules():
    """Every Linear layer of the transformer (what BFL's control LoRAs carry) and every qk-norm."""
    return fluxmaps.bfl_modules(), list(fluxmaps.norm_modules())


def control_file(path, seed=11, bias=True, scale=0.2):
    """A BFL-layout control LoRA at tiny width: lora_A/lora_B (+ lora_B.bias) on every Linear layer (img_in with
    :data:`CIN` input channels) and a new scale for every qk-norm. Returns the state dict written."""
    shapes = _shapes("tiny")
    g = torch.Generator().manual_seed(seed)
    linears, norms = _modules()
    sd = {}
    for m in linears:
        o, i = shapes[m + ".weight"]
        if m == "img_in":
            i = CIN
        sd[m + ".lora_A.weight"] = torch.randn(R, i, generator=g) * scale
        if m == "final_layer.adaLN_modulation.1":   # equal halves: see the module docstring
            sd[m + ".lora_A.weight"][R // 2:] = sd[m + ".lora_A.weight"][: R // 2]
        sd[m + ".lora_B.weight"] = torch.randn(o, R, generator=g) * scale
        if bias:
            sd[m + ".lora_B.bias"] = torch.randn(o, generator=g) * 0.05
    for m in norms:
        sd[m + ".scale"] = torch.rand(shapes[m + ".scale"], generator=g) + 0.5
    save_safetensors(path, sd)
    return sd


# ----------------------------------------------------------------------------------- diffusers' map of the file
@pytest.fixture(scope="module")
def control_map():
    """diffusers LoRA key -> [(BFL key, first row fraction, end fraction)], read from
    ``_convert_bfl_flux_control_lora_to_diffusers`` run at full width on coded one-column tensors (lora_A with
    two rows, a stand-in for the rank: the converter chunks the final modulation's lora_A in two)."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    shapes = _shapes("full")
    linears, norms = _modules()
    names, ref = [], {}

    def code(key, rows):
        names.append(key)
        return (torch.arange(rows, dtype=torch.float64) + (len(names) - 1) * 2 ** 20)

    for m in linears:
        o = shapes[m + ".weight"][0]
        ref[m + ".lora_A.weight"] = code(m + ".lora_A.weight", 2).reshape(2, 1)
        ref[m + ".lora_B.weight"] = code(m + ".lora_B.weight", o).reshape(o, 1)
        ref[m + ".lora_B.bias"] = code(m + ".lora_B.bias", o)
    for m in norms:
        ref[m + ".scale"] = code(m + ".scale", 1)
    rows = {k: int(v.shape[0]) for k, v in ref.items()}
    out = {}
    for dk, v in _convert_bfl_flux_control_lora_to_diffusers(dict(ref)).items():
        v = v.reshape(-1).long()
        src, row = v >> 20, v & (2 ** 20 - 1)
        brk = ((src[1:] != src[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().reshape(-1) + 1
        segs = []
        for a, b in zip([0] + brk.tolist(), brk.tolist() + [len(v)]):
            k = names[int(src[a])]
            segs.append((k, Fraction(int(row[a]), rows[k]), Fraction(int(row[b - 1]) + 1, rows[k])))
        out[dk] = segs
    return out


def to_diffusers_lora(sd, cmap):
    out = {}
    for dk, segs in cmap.items():
        parts = []
        for k, a, b in segs:
            n = sd[k].shape[0]
            assert (a * n).denominator == 1 and (b * n).denominator == 1
            parts.append(sd[k][int(a * n):int(b * n)])
        out[dk] = torch.cat(parts, 0).clone()
    return out


def _forward(m, cin):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(3)
        n_img, n_txt = 8, 5
        with torch.no_grad():
            return m(hidden_states=torch.randn(1, n_img, cin, generator=g),
                     encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
                     pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                     img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(n_txt, 3),
                     guidance=torch.tensor([3.5]), return_dict=False)[0]
    finally:
        torch.set_num_threads(threads)


def _reference(base_sd, lora_sd, row_map, cmap, multiplier=1.0):
    from diffusers import FluxControlPipeline

    m = _model(to_diffusers(base_sd, row_map))
    pipe = FluxControlPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=m)
    pipe.load_lora_weights(to_diffusers_lora(lora_sd, cmap), adapter_name="control")
    assert m.x_embedder.in_features == CIN and m.config.in_channels == CIN   # diffusers widened it
    if multiplier != 1.0:
        pipe.set_adapters(["control"], [multiplier])
    return _forward(m, CIN)


def _baked_model(out_path, row_map):
    sd = to_diffusers(load_state_dict(out_path), row_map)
    m = flux.build_diffusers_transformer("tiny", "dev")
    m.x_embedder = torch.nn.Linear(sd["x_embedder.weight"].shape[1], H)
    m.load_state_dict(sd, strict=True)
    return m.float().eval()


@pytest.mark.parametrize("multiplier", [0.6])   # not 1: the strength must scale ΔW and Δbias, and not the set norms
def test_control_lora_bake_equals_diffusers_flux_control_loader(base, row_map, control_map, tmp_path, multiplier):
    from lib_sdtoolkit.lora.bake import bake

    lp = tmp_path / "flux1-canny-dev-lora.safetensors"
    lora_sd = control_file(lp)
    out = tmp_path / "baked.safetensors"
    res = bake(base["bfl"], [(lp, multiplier)], out)
    assert res["widened"] == {"img_in.weight": {"from": [H, 64], "to": [H, CIN]}}
    assert res["loras"][0]["unmatched"] == 0
    ref = _reference(base["sd"], lora_sd, row_map, control_map, multiplier)
    ours = _forward(_baked_model(out, row_map), CIN)
    # the LoRA matters: the checkpoint widened by zeros and nothing else gives another output
    plain_sd = dict(base["sd"])
    plain_sd["img_in.weight"] = torch.cat([plain_sd["img_in.weight"], torch.zeros(H, CIN - 64)], 1)
    p0 = tmp_path / "plain-wide.safetensors"
    save_safetensors(p0, plain_sd)
    plain = _forward(_baked_model(p0, row_map), CIN)
    assert not torch.allclose(plain, ref, atol=1e-3)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), float((ours - ref).abs().max())


def test_control_lora_bake_in_plain_torch(base, tmp_path):
    """Every key of the bake against the rule written out here: W + m·B@A on the Linear layers (img_in widened by
    zero columns first), bias + m·lora_B.bias, and each qk-norm's scale replaced whatever the multiplier."""
    from lib_sdtoolkit.lora.bake import bake

    lp = tmp_path / "control.safetensors"
    lora_sd = control_file(lp, seed=12)
    out = tmp_path / "baked.safetensors"
    m = 0.6
    bake(base["bfl"], [(lp, m)], out)
    got = load_state_dict(out)
    src = base["sd"]
    assert set(got) == set(src)
    linears, norms = _modules()
    for k, v in src.items():
        mod, _, param = k.rpartition(".")
        if mod in linears and param == "weight":
            w = v.float()
            if mod == "img_in":
                w = torch.cat([w, torch.zeros(w.shape[0], CIN - w.shape[1])], 1)
            want = w.add(lora_sd[mod + ".lora_B.weight"] @ lora_sd[mod + ".lora_A.weight"], alpha=m)
        elif mod in linears and param == "bias":
            want = v.float().add(lora_sd[mod + ".lora_B.bias"], alpha=m)
        elif mod in norms:
            want = lora_sd[mod + ".scale"]
        else:
            want = v
        assert got[k].shape == want.shape, k
        assert torch.equal(got[k], want.to(got[k].dtype)), k


def test_control_lora_onto_diffusers_and_all_in_one_layouts_bit_equal(base, row_map, tmp_path):
    """The same bake onto the checkpoint in diffusers names (``x_embedder`` widened, ``attn.norm_q.weight`` set)
    and in ComfyUI's all-in-one layout equals the BFL bake, key for key."""
    from lib_sdtoolkit.lora.bake import bake

    lp = tmp_path / "control.safetensors"
    control_file(lp, seed=13)
    ref = load_state_dict(bake(base["bfl"], [(lp, 1.0)], tmp_path / "bfl.safetensors")["output"])
    dsd = to_diffusers(base["sd"], row_map)
    dp = tmp_path / "flux-diffusers.safetensors"
    save_safetensors(dp, dsd)
    res = bake(dp, [(lp, 1.0)], tmp_path / "d.safetensors")
    assert res["widened"] == {"x_embedder.weight": {"from": [H, 64], "to": [H, CIN]}}
    got = load_state_dict(res["output"])
    want = to_diffusers(ref, row_map)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    aio = {"model.diffusion_model." + k: v for k, v in base["sd"].items()}
    aio["vae.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)
    ap = tmp_path / "flux-aio.safetensors"
    save_safetensors(ap, aio)
    got = load_state_dict(bake(ap, [(lp, 1.0)], tmp_path / "a.safetensors")["output"])
    for k, v in ref.items():
        assert torch.equal(got["model.diffusion_model." + k], v), k
    assert torch.equal(got["vae.decoder.conv_in.weight"], aio["vae.decoder.conv_in.weight"])


def test_control_lora_in_comfy_names_and_the_result_is_named(base, tmp_path):
    """ComfyUI's conversion of the same file (``diffusion_model.`` prefix, ``diff_b``-free ``lora_B.bias`` kept,
    ``_norm.set_weight``) bakes to the same bits; ``inspect`` of the result says the widened img_in."""
    from lib_sdtoolkit.inspect import inspect_file
    from lib_sdtoolkit.lora.bake import bake

    lp = tmp_path / "control.safetensors"
    sd = control_file(lp, seed=14)
    comfy = {"diffusion_model." + k.replace("_norm.scale", "_norm.set_weight"): v for k, v in sd.items()}
    cp = tmp_path / "control-comfy.safetensors"
    save_safetensors(cp, comfy)
    a = load_state_dict(bake(base["bfl"], [(lp, 1.0)], tmp_path / "a.safetensors")["output"])
    b = load_state_dict(bake(base["bfl"], [(cp, 1.0)], tmp_path / "b.safetensors")["output"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    rep = inspect_file(tmp_path / "a.safetensors")
    assert rep["architecture"] == "Flux.1" and rep["variant"] == "dev"
    assert any("img_in takes 128 input channels" in n for n in rep["notes"]), rep["notes"]


def test_inspect_names_a_control_lora(tmp_path):
    from lib_sdtoolkit.lora.inspect_lora import inspect_lora

    lp = tmp_path / "flux1-depth-dev-lora.safetensors"
    control_file(lp, seed=15)
    rep = inspect_lora(lp)
    n_norms = len(fluxmaps.norm_modules())
    assert rep["base_model"] == "Flux.1" and rep["naming"] == "bfl"
    assert rep["types"] == {"lora": len(fluxmaps.bfl_modules()), "set": n_norms}
    assert rep["unmatched"] == 0 and rep["unmatched_modules"] == [] and rep["not_applied"] == []
    assert rep["control"]["img_in_channels"] == CIN and rep["control"]["set_layers"] == n_norms
    assert "control LoRA" in rep["control"]["note"] and "64 to 128" in rep["control"]["note"]
    # an ordinary Flux LoRA is no control LoRA
    plain = tmp_path / "plain.safetensors"
    save_safetensors(plain, {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(R, H),
                             "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(3 * H, R)})
    assert inspect_lora(plain)["control"] is None


def test_stacked_control_loras_the_last_one_sets_the_norms(base, tmp_path):
    """Two networks that set the same norm: the later one's value, as the hosts apply ``set`` patches in order; a
    network at multiplier 0 sets nothing."""
    from lib_sdtoolkit.lora.bake import bake

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sa, sb = control_file(a, seed=22), control_file(b, seed=23)
    _, norms = _modules()
    got = load_state_dict(bake(base["bfl"], [(a, 1.0), (b, 0.5)], tmp_path / "ab.safetensors")["output"])
    assert all(torch.equal(got[m + ".scale"], sb[m + ".scale"]) for m in norms)
    got = load_state_dict(bake(base["bfl"], [(a, 1.0), (b, 0.0)], tmp_path / "a0.safetensors")["output"])
    assert all(torch.equal(got[m + ".scale"], sa[m + ".scale"]) for m in norms)


def test_two_control_loras_that_disagree_on_img_in_are_refused(base, tmp_path):
    from lib_sdtoolkit.lora.bake import bake

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    control_file(a, seed=16)
    sd = control_file(b, seed=17)
    sd["img_in.lora_A.weight"] = torch.zeros(R, 192)
    save_safetensors(b, sd, overwrite=True)
    with pytest.raises(SdToolkitError) as e:
        bake(base["bfl"], [(a, 1.0), (b, 1.0)], tmp_path / "out.safetensors")
    msg = str(e.value)
    assert "b.safetensors" in msg and "img_in.weight to 192 input channels" in msg and "to 128" in msg, msg
    assert not (tmp_path / "out.safetensors").exists()


def test_forge_bridge_refuses_a_control_lora_at_generation(tmp_path):
    """In Forge the sampler feeds no control image: every layer is listed as not applied, with the reason, and no
    weight is patched (the norms alone would spoil the image)."""
    from lib_sdtoolkit.lora.apply import ActiveNetwork
    from lib_sdtoolkit.lora.network import load_network
    from lib_sdtoolkit.lora.patcher_bridge import CONTROL_NOT_APPLIED, build_patches

    lp = tmp_path / "control.safetensors"
    control_file(lp, seed=18)
    shapes = {"diffusion_model." + k: tuple(s) for k, s in flux.bfl_specs("tiny", "dev")}
    net = load_network(lp, "Flux.1")
    ps = build_patches(ActiveNetwork(net, 1.0, 1.0), "Flux.1", {}, {}, shapes.get)
    assert ps.unet == {} and ps.clip == {}
    assert len(ps.unmatched) == len(net.layers) and all(CONTROL_NOT_APPLIED in u for u in ps.unmatched)
    # an ordinary LoRA on the same model is patched
    plain = tmp_path / "plain.safetensors"
    save_safetensors(plain, {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(R, H),
                             "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(3 * H, R)})
    ps = build_patches(ActiveNetwork(load_network(plain, "Flux.1"), 1.0, 1.0), "Flux.1", {}, {}, shapes.get)
    assert list(ps.unet) == ["diffusion_model.double_blocks.0.img_attn.qkv.weight"] and not ps.unmatched


def test_merge_loras_refuses_a_control_lora(tmp_path):
    from lib_sdtoolkit.lora.merge_loras import merge_loras

    a = tmp_path / "control.safetensors"
    control_file(a, seed=19)
    with pytest.raises(SdToolkitError) as e:
        merge_loras([(a, 1.0), (a, 0.5)], tmp_path / "m.safetensors")
    assert "control.safetensors" in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("to", ["kohya", "diffusers", "comfy"])
def test_convert_refuses_a_control_lora_by_name(tmp_path, to):
    from lib_sdtoolkit.lora.convert import convert

    src = tmp_path / "control.safetensors"
    control_file(src, seed=20)
    with pytest.raises(SdToolkitError) as e:
        convert(src, tmp_path / "out.safetensors", to)
    assert "control.safetensors" in str(e.value) and "control LoRA" in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_and_lora_tab_say_control(base, tmp_path, capsys):
    """The faces: ``lora inspect`` names the control LoRA, ``lora bake`` says which key it widened, and the LoRA
    tab's report shows it."""
    from lib_sdtoolkit import cli
    from lib_sdtoolkit.ui.lora_tab import inspect_html

    lp = tmp_path / "flux1-canny-dev-lora.safetensors"
    control_file(lp, seed=21)
    capsys.readouterr()
    assert cli.main(["lora", "inspect", str(lp)]) == 0
    out = capsys.readouterr().out
    assert "control    : a Flux control LoRA" in out and "from 64 to 128 input channels" in out, out
    out_ck = tmp_path / "flux1-canny-dev-baked.safetensors"
    assert cli.main(["lora", "bake", str(base["bfl"]), f"{lp}:1", "-o", str(out_ck)]) == 0
    out = capsys.readouterr().out
    assert f"img_in.weight: widened from [{H}, 64] to [{H}, {CIN}]" in out, out
    capsys.readouterr()
    assert cli.main(["lora", "inspect", str(lp), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    html = inspect_html(dict(rep, name=lp.name))
    assert "Control LoRA" in html and f"sets {len(fluxmaps.norm_modules())} qk-norm scales" in html
    assert "Every module would be baked (a control LoRA is not applied at generation)" in html


def test_extract_a_control_model_against_its_base_gives_a_bfl_control_lora(base, row_map, control_map, tmp_path):
    """``lora extract`` of a Canny/Depth-style model (the base with a control LoRA baked in) against the base: a
    control LoRA in BFL's layout, which bakes back onto the base to the control model, and which diffusers' Flux
    Control loader applies to the same forward pass."""
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.extract import extract_lora
    from lib_sdtoolkit.lora.inspect_lora import inspect_lora

    lp = tmp_path / "control.safetensors"
    control_file(lp, seed=24)
    tuned = tmp_path / "flux1-canny-dev.safetensors"
    bake(base["bfl"], [(lp, 1.0)], tuned)
    x = tmp_path / "extracted.safetensors"
    res = extract_lora(tuned, base["bfl"], x, rank=R, dtype="fp32")
    n_norms = len(fluxmaps.norm_modules())
    assert res["control"] == {"widened": {"img_in": {"from": [H, 64], "to": [H, CIN]}}, "set_layers": n_norms}
    assert res["layers"] == len(fluxmaps.bfl_modules()) and res["min_energy"] > 0.999999
    got = load_state_dict(x)
    linears, norms = _modules()
    want_keys = {m + s for m in linears for s in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")}
    want_keys |= {m + ".scale" for m in norms}
    assert set(got) == want_keys and got["img_in.lora_A.weight"].shape == (R, CIN)
    rep = inspect_lora(x)
    assert rep["naming"] == "bfl" and rep["control"]["img_in_channels"] == CIN and rep["unmatched"] == 0
    back = load_state_dict(bake(base["bfl"], [(x, 1.0)], tmp_path / "back.safetensors")["output"])
    want = load_state_dict(tuned)
    for k, v in want.items():
        assert back[k].shape == v.shape, k
        torch.testing.assert_close(back[k], v, rtol=1e-4, atol=2e-6, msg=k)
    # diffusers loads it (its converter pops every key BFL's files have: none may be missing); its swap of the final
    # modulation's lora_A halves (module docstring) is undone beforehand, as a file with equal halves needs none
    fixed = dict(got)
    a = fixed["final_layer.adaLN_modulation.1.lora_A.weight"]
    fixed["final_layer.adaLN_modulation.1.lora_A.weight"] = torch.cat([a[R // 2:], a[: R // 2]], 0)
    ref = _reference(base["sd"], fixed, row_map, control_map)
    ours = _forward(_baked_model(tuned, row_map), CIN)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-3), float((ours - ref).abs().max())


def test_flux_extract_through_the_job_layer(base, tmp_path, capsys):
    """The CLI (the job layer every face uses) runs a Flux extract, with the energy rank mode, and prints the
    control line for a control model."""
    from lib_sdtoolkit import cli
    from lib_sdtoolkit.lora.bake import bake

    g = torch.Generator().manual_seed(25)
    tuned_sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v) for k, v in base["sd"].items()}
    tuned = tmp_path / "tuned.safetensors"
    save_safetensors(tuned, tuned_sd)
    capsys.readouterr()
    assert cli.main(["lora", "extract", str(tuned), str(base["bfl"]), "-o", str(tmp_path / "x.safetensors"),
                     "--rank", "8", "--rank-mode", "energy", "--energy", "0.5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["arch"] == "Flux.1" and rep["rank_mode"] == "energy" and rep["control"] is None
    assert rep["layers"] == len(rep["layer_report"]) == len(fluxmaps.bfl_modules())
    assert all(1 <= x["rank"] <= 8 and 0 < x["energy"] <= 1 for x in rep["layer_report"])
    assert any(x["rank"] < 8 for x in rep["layer_report"])   # the energy mode chose the ranks
    lp = tmp_path / "control.safetensors"
    control_file(lp, seed=26)
    cm = tmp_path / "canny.safetensors"
    bake(base["bfl"], [(lp, 1.0)], cm)
    assert cli.main(["lora", "extract", str(cm), str(base["bfl"]), "-o", str(tmp_path / "c.safetensors"),
                     "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "BFL control LoRA (img_in 64 -> 128 channels; 152 qk-norm scales set)" in out, out


def test_a_cli_bake_is_recorded_in_the_history_with_absolute_lora_paths(base, tmp_path, monkeypatch):
    """Seen in the real Forge Neo: every CLI ``lora bake`` warned "could not record the lora-bake run in the
    history" (its ``loras`` are a list of objects, which the absolute-path step took for paths)."""
    from lib_sdtoolkit import cli, history

    lp = tmp_path / "control.safetensors"
    control_file(lp, seed=27)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lora", "bake", str(base["bfl"]), "control.safetensors:0.5", "-o", str(out_dir / "c.safetensors"),
                     "-q"]) == 0
    entries, bad = history.read(out_dir)
    assert bad == 0 and [e["job"] for e in entries] == ["lora-bake"]
    assert entries[0]["request"]["loras"][0]["lora"] == str(lp.resolve())
    assert entries[0]["request"]["loras"][0]["multiplier"] == 0.5
