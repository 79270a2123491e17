"""<sdtlora> on Forge: our networks as patches for Forge's LoRA patcher (lib_sdtoolkit.lora.patcher_bridge).

Forge facts the tests rest on (Forge 2.0.1 backend/patcher/lora.py, packages_3rdparty comfyui_lora_collection):
* the key map of ``model_lora_keys_unet`` names every UNet weight ``lora_unet_<ldm path with _>`` ->
  ``diffusion_model.<ldm path>.weight``; ``model_lora_keys_clip`` names SD1's CLIP-L weights
  ``lora_te_text_model_encoder_layers_<n>_<...>`` -> ``clip_l.transformer.text_model.encoder.layers.<n>.<...>.weight``;
* ``LoraLoader.refresh`` merges each parameter as ``w = fp32 copy``, then for every patch of the key
  ``extra_weight_calculators[type](w, strength, payload)``, and re-merges only when the *identifiers* of the patch
  sets change.
The expected weights are computed independently from the file's factors (W + m * alpha/rank * up @ down).
"""
import pytest
import torch

from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.lora.apply import ActiveNetwork, ModelBinding
from lib_sdtoolkit.lora.blocks import resolve_block_weights
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.lora.patcher_bridge import (PATCH_TYPE, LayerPatch, apply_patch, build_patches,
                                               unavailable_options)
from lib_sdtoolkit.lora.synth import make_lora_state_dict


@pytest.fixture(scope="module")
def sd1(tiny_modules):
    return tiny_modules("SD1")


@pytest.fixture(scope="module")
def forge_keys(sd1):
    """(unet key map, clip key map, {param: shape}) with Forge's naming of the same modules."""
    unet = {f"diffusion_model.{k}": tuple(v.shape) for k, v in sd1["unet"].named_parameters()}
    clip = {f"clip_l.transformer.{k}": tuple(v.shape) for k, v in sd1["text_encoder"].named_parameters()}
    unet_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                for k in unet if k.endswith(".weight")}
    clip_map = {"lora_te_" + k[len("clip_l.transformer."):-len(".weight")].replace(".", "_"): k
                for k in clip if k.endswith(".weight") and ".encoder.layers." in k}
    return unet_map, clip_map, {**unet, **clip}


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, sd1):
    binding = ModelBinding.from_parts("SD1", unet=sd1["unet"], text_encoder=sd1["text_encoder"])
    sd = make_lora_state_dict(binding.target_shape, "SD1", rank=4, seed=7)
    return save_safetensors(tmp_path_factory.mktemp("forge") / "net.safetensors", sd), sd


def _param(sd1, key):
    if key.startswith("diffusion_model."):
        return dict(sd1["unet"].named_parameters())[key[len("diffusion_model."):]]
    return dict(sd1["text_encoder"].named_parameters())[key[len("clip_l.transformer."):]]


def _merge_like_forge(weight, patches):
    """LoraLoader.refresh + merge_lora_to_weight for our patch type (strength_patch 1.0, strength_model 1.0)."""
    w = weight.detach().to(torch.float32).clone()
    calculators = {PATCH_TYPE: apply_patch}
    for ptype, payload in patches:
        w = calculators[ptype](w, 1.0, payload)
    return w


def _expected_delta(sd, kohya_name):
    up, down = sd[kohya_name + ".lora_up.weight"].float(), sd[kohya_name + ".lora_down.weight"].float()
    alpha = float(sd[kohya_name + ".alpha"]) if kohya_name + ".alpha" in sd else up.shape[1]
    return (alpha / up.shape[1]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


def test_every_layer_lands_on_forges_parameter_with_the_lora_maths(sd1, forge_keys, lora_file):
    path, sd = lora_file
    net = load_network(path, "SD1")
    unet_map, clip_map, shapes = forge_keys
    ps = build_patches(ActiveNetwork(net, te=0.7, unet=0.4), "SD1", unet_map, clip_map, shapes.get)
    assert not ps.unmatched
    assert len(ps.unet) + len(ps.clip) == len(net.layers)
    names_by_key = {}
    for layer in net.layers:
        is_te = layer.component.startswith("text_encoder")
        for k, (_, payload) in (ps.clip if is_te else ps.unet).items():
            if payload.weights is layer.weights:
                names_by_key[k] = layer.weights.name
    checked = 0
    for key, name in list(names_by_key.items())[:40]:
        w0 = _param(sd1, key)
        got = _merge_like_forge(w0, [(ps.clip if key.startswith("clip_l.") else ps.unet)[key]])
        m = 0.7 if key.startswith("clip_l.") else 0.4
        want = w0.detach().float() + m * _expected_delta(sd, name).reshape(w0.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked >= 20
    assert any(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in ps.clip)
    assert all(k.startswith("diffusion_model.") for k in ps.unet)


def test_lbw_is_a_per_layer_strength_and_changes_the_identifier(forge_keys, lora_file):
    path, _ = lora_file
    net = load_network(path, "SD1")
    unet_map, clip_map, shapes = forge_keys
    bw = resolve_block_weights("1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1", "SD1")   # BASE and OUT11 only
    plain = build_patches(ActiveNetwork(net, 1.0, 1.0), "SD1", unet_map, clip_map, shapes.get)
    lbw = build_patches(ActiveNetwork(net, 1.0, 1.0, block_weights=bw), "SD1", unet_map, clip_map, shapes.get)
    assert lbw.identifier != plain.identifier        # the patcher re-merges only when identifiers change
    assert lbw.clip.keys() == plain.clip.keys()       # BASE = text encoder, weight 1
    assert lbw.unet and set(lbw.unet) < set(plain.unet)
    for k, (_, payload) in lbw.unet.items():
        assert k.startswith("diffusion_model.output_blocks.11.") or not k.startswith(
            ("diffusion_model.input_blocks.", "diffusion_model.middle_block.", "diffusion_model.output_blocks."))
        assert payload.multiplier == 1.0


def test_start_stop_are_reported_not_silently_dropped(lora_file):
    net = load_network(lora_file[0], "SD1")
    assert unavailable_options(ActiveNetwork(net, start=3, stop=10)) == ["start=3", "stop=10"]
    assert unavailable_options(ActiveNetwork(net)) == []


def test_zero_strength_patch_leaves_the_weight_bit_identical(lora_file):
    net = load_network(lora_file[0], "SD1")
    layer = net.layers[0]
    w = torch.randn(layer.weights.t["lora_up.weight"].shape[0], layer.weights.t["lora_down.weight"].shape[1])
    assert torch.equal(apply_patch(w.clone(), 0.0, LayerPatch(layer.weights, 1.0)), w)


# ------------------------------------------------------------------ scripts/sdtoolkit_forge_lora.py on both patchers
# The Forge flavours of the WebUI double (tests/webui_double/forge/): Forge 2.0.1's patcher (add_patches(*, filename,
# ...), lora_patches, LoraLoader.refresh, extra_weight_calculators) and Forge Neo's (ComfyUI's ModelPatcher:
# add_patches(patches, strength_patch), patches per key, WeightAdapterBase values, model_lora_keys_clip returning
# (keys, map)). A generation is driven at the points Forge calls the script: the extra networks' activate, the
# script's after_extra_networks_activate and process_batch (CLIP; Forge's conds are computed right after), Forge's
# reset of forge_objects before sampling, process_before_every_sampling (UNet), and the patcher's load.
import copy  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
if str(DOUBLE) not in sys.path:
    sys.path.append(str(DOUBLE))


def _load(patcher, flavour):
    """The patcher's own load: Forge 2.0.1 refresh_loras() (memory_management's load), Neo patch_model()."""
    if flavour == "forge201":
        patcher.refresh_loras()
    else:
        patcher.patch_model()


@pytest.fixture(params=["forge201", "neo"])
def forge(request, sd1, lora_file, tmp_path, monkeypatch):
    import argparse

    from webui_harness import unuse_forge, use_forge

    flavour = request.param
    use_forge(flavour)
    try:
        from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
        from backend.patcher.clip import CLIP
        from backend.patcher.unet import UnetPatcher
        from modules import extra_networks, script_callbacks, script_loading, shared

        kmodel = torch.nn.Module()                       # Forge's KModel: the UNet at .diffusion_model
        kmodel.diffusion_model = copy.deepcopy(sd1["unet"])
        kmodel.storage_dtype = torch.float32
        clip_l = torch.nn.Module()                       # the CLIP-L engine: the HF text model at .transformer
        clip_l.transformer = copy.deepcopy(sd1["text_encoder"])
        engine = ForgeDiffusionEngine(ForgeObjects(UnetPatcher(kmodel), CLIP({"clip_l": clip_l}), None, None),
                                      is_sd1=True)
        lora_dir = tmp_path / "Lora"
        lora_dir.mkdir()
        (lora_dir / "net.safetensors").write_bytes(Path(lora_file[0]).read_bytes())
        monkeypatch.setattr(shared, "cmd_opts", argparse.Namespace(lora_dir=str(lora_dir), lora_dirs=[]))
        script_callbacks.clear_callbacks()
        extra_networks.initialize()
        mod = script_loading.load_module(str(ROOT / "scripts" / "sdtoolkit_forge_lora.py"))
        script_callbacks.before_ui_callback()
        base = {k: v.detach().clone() for k, v in [*kmodel.named_parameters(), *engine.forge_objects.clip
                                                    .cond_stage_model.named_parameters()]}
        yield types.SimpleNamespace(flavour=flavour, mod=mod, engine=engine, kmodel=kmodel, base=base,
                                    registry=extra_networks.extra_network_registry)
    finally:
        from modules import extra_networks, script_callbacks

        script_callbacks.clear_callbacks()
        extra_networks.initialize()
        unuse_forge()


def _generate(f, tags):
    """One generation with ``tags`` = [[name, te, unet], ...] as <sdtlora> params; returns p."""
    from lib_sdtoolkit.lora.syntax import ExtraNetworkParams

    e = f.engine
    p = types.SimpleNamespace(sd_model=e, extra_generation_params={}, comments=[])
    p.comment = p.comments.append
    e.forge_objects = e.forge_objects_after_applying_lora.shallow_copy()
    f.mod.network.activate(p, [ExtraNetworkParams.from_items(t) for t in tags])
    script = f.mod.SdToolkitForgeLoraScript()
    script.after_extra_networks_activate(p)
    script.process_batch(p)            # nothing reset in between: the CLIP set must not be added twice
    _load(e.forge_objects.clip.patcher, f.flavour)
    e.forge_objects = e.forge_objects_after_applying_lora.shallow_copy()     # Forge, before each sampling pass
    script.process_before_every_sampling(p)
    _load(e.forge_objects.unet, f.flavour)
    return p


def _live(f):
    """{parameter: the tensor the model holds now} (the patchers swap Parameters, so read them after each load)."""
    return {k: v.detach() for k, v in [*f.kmodel.named_parameters(),
                                       *f.engine.forge_objects.clip.cond_stage_model.named_parameters()]}


def test_script_on_both_patchers_merges_the_lora_once_and_restores_exactly(forge, lora_file):
    f = forge
    assert f.mod.IS_FORGE and f.mod.network is not None and f.registry["sdtlora"] is f.mod.network
    assert f.mod._KIND == ("calculator" if f.flavour == "forge201" else "adapter")
    _, sd = lora_file
    p = _generate(f, [["net", "0.7", "0.4"]])
    assert p.extra_generation_params["SD Toolkit Lora"] == "net: 0.7/0.4" and p.comments == []
    # which parameter each file module lands on: the Forge key naming checked in the first test of this file
    unet_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                for k in f.base if k.startswith("diffusion_model.") and k.endswith(".weight")}
    clip_map = {"lora_te_" + k[len("clip_l.transformer."):-len(".weight")].replace(".", "_"): k
                for k in f.base if k.startswith("clip_l.") and k.endswith(".weight") and ".encoder.layers." in k}
    ps = build_patches(ActiveNetwork(load_network(lora_file[0], "SD1")), "SD1", unet_map, clip_map,
                       lambda k: tuple(f.base[k].shape) if k in f.base else None)
    names = {k: payload.weights.name for k, (_, payload) in [*ps.unet.items(), *ps.clip.items()]}
    assert len(names) == len(ps.unet) + len(ps.clip) > 40
    live = _live(f)
    for key, name in list(names.items())[::4]:       # every 4th layer of the file (speed), both models
        w0 = f.base[key]
        m = 0.7 if key.startswith("clip_l.") else 0.4
        want = w0.float() + m * _expected_delta(sd, name).reshape(w0.shape)
        torch.testing.assert_close(live[key].float(), want, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(live[k], f.base[k]) for k in names)      # every layer of the file landed
    untouched = [k for k in f.base if k not in names]
    assert untouched and all(torch.equal(live[k], f.base[k]) for k in untouched)

    p = _generate(f, [])                                # the next generation without <sdtlora>: weights restored
    assert "SD Toolkit Lora" not in p.extra_generation_params
    live = _live(f)
    for key, w0 in f.base.items():
        assert torch.equal(live[key], w0), key


def test_script_says_under_the_image_when_a_lora_applies_partly(forge, lora_file):
    """A <sdtlora> with modules the model lacks applied the rest and, on Forge, said so only in the console
    (log.info); A1111 says it under the image (checked in the real A1111 1.10.1). Forge now does too, same words."""
    from safetensors.torch import save_file

    from modules import shared

    sd = dict(lora_file[1])
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(1, 8)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 1)
    sd["lora_unet_no_such_layer.alpha"] = torch.tensor(1.0)
    save_file(sd, str(Path(shared.cmd_opts.lora_dir) / "partly.safetensors"))
    p = _generate(forge, [["partly", "1", "1"]])
    assert p.extra_generation_params["SD Toolkit Lora"] == "partly: 1/1"
    assert len(p.comments) == 1, p.comments
    assert p.comments[0].startswith("partly applies partly: 1 of ")
    assert "1 unknown target name (e.g. lora_unet_no_such_layer)" in p.comments[0]
    p = _generate(forge, [["net", "1", "1"]])                 # a LoRA that applies fully: no comment
    assert p.comments == []


def test_script_beside_forges_own_lora_gives_the_sum(forge, lora_file):
    """<lora:net:0.3> (Forge's loader: its patch set on forge_objects_after_applying_lora, here as ``diff`` patches of
    the file's ΔW) with <sdtlora:net:0.4>: every layer gets W + 0.3 ΔW + 0.4 ΔW; then Forge's alone: W + 0.3 ΔW."""
    f = forge
    _, sd = lora_file
    e = f.engine
    unet_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                for k in f.base if k.startswith("diffusion_model.") and k.endswith(".weight")}
    clip_map = {"lora_te_" + k[len("clip_l.transformer."):-len(".weight")].replace(".", "_"): k
                for k in f.base if k.startswith("clip_l.") and k.endswith(".weight") and ".encoder.layers." in k}
    ps = build_patches(ActiveNetwork(load_network(lora_file[0], "SD1")), "SD1", unet_map, clip_map,
                       lambda k: tuple(f.base[k].shape) if k in f.base else None)
    names = {k: payload.weights.name for k, (_, payload) in [*ps.unet.items(), *ps.clip.items()]}
    delta = {k: _expected_delta(sd, n).reshape(f.base[k].shape) for k, n in list(names.items())[::4]}

    def forge_lora(strength):     # extensions-builtin/sd_forge_lora networks.load_networks + load_lora_for_models
        fo = e.forge_objects_original
        unet, clip = fo.unet.clone(), fo.clip.clone()
        for obj, pre in ((unet, "diffusion_model."), (clip, "clip_l.")):
            patches = {k: ("diff", (d,)) for k, d in delta.items() if k.startswith(pre)}
            if f.flavour == "forge201":
                obj.add_patches(filename="forge-lora:net", patches=patches, strength_patch=strength)
            else:
                obj.add_patches(patches, strength)
        e.forge_objects.unet, e.forge_objects.clip = unet, clip
        e.forge_objects_after_applying_lora = e.forge_objects.shallow_copy()

    forge_lora(0.3)
    _generate(f, [["net", "0.4"]])
    live = _live(f)
    for k, d in delta.items():
        torch.testing.assert_close(live[k].float(), f.base[k].float() + 0.7 * d, rtol=1e-5, atol=1e-5)
    _generate(f, [])
    live = _live(f)
    for k, d in delta.items():
        torch.testing.assert_close(live[k].float(), f.base[k].float() + 0.3 * d, rtol=1e-5, atol=1e-5)


def test_script_lands_on_the_same_bits_as_forges_own_lora(forge, lora_file):
    """<sdtlora:net:0.3> and Forge's own <lora:net:0.3> (the flavour's load_lora + its ``lora`` patch maths, in Forge's
    order: up @ down, then scaled, then added) leave every patched parameter bit-identical.

    Why bits and not a tolerance: in the real Forge 2.0.1 (full-size SD1 with random weights, 64x64, 2 steps) the
    1-ulp difference of a fused addmm made <sdtlora:toy_b:0.3> and <lora:toy_b:0.3> differ by up to 64/255, while each
    of its text-encoder and UNet halves alone agreed within 1/255 (Forge's own <lora:toy_b:0.300001> differs from
    <lora:toy_b:0.3> by 205/255 there: the sampled image is that sensitive).
    Forge's CLIP key map is the flavour's own; for the UNet the double keeps only the ldm spellings, while the file
    (as kohya writes SD1) uses the diffusers ones that real Forge maps through ``unet_to_diffusers``, so Forge's loader
    is given the module -> parameter pairs our bridge found (which parameter each name is: the first test here, and
    the same key sets as Forge's own loader in the real Forge 2.0.1)."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip

    from lib_sdtoolkit.lora.patcher_bridge import key_map_of

    f = forge
    e = f.engine
    _, sd = lora_file
    _generate(f, [["net", "0.3"]])
    ours = {k: v.clone() for k, v in _live(f).items()}
    _generate(f, [])                                   # restored (checked in the test above)

    fo = e.forge_objects_original                       # sd_forge_lora: load_lora_for_models, strength 0.3 both
    clip_map = key_map_of(model_lora_keys_clip, fo.clip.cond_stage_model)
    unet_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                for k in f.base if k.startswith("diffusion_model.") and k.endswith(".weight")}
    ps = build_patches(ActiveNetwork(load_network(lora_file[0], "SD1")), "SD1", unet_map, clip_map,
                       lambda k: tuple(f.base[k].shape) if k in f.base else None)
    unet_patches, rest = load_lora(sd, {v[1].weights.name: k for k, v in ps.unet.items()})
    clip_patches, rest = load_lora(rest, clip_map)
    assert not rest and len(unet_patches) > 20 and len(clip_patches) > 20
    unet, clip = fo.unet.clone(), fo.clip.clone()
    for obj, patches in ((unet, unet_patches), (clip, clip_patches)):
        if f.flavour == "forge201":
            obj.add_patches(filename="net.safetensors", patches=patches, strength_patch=0.3, strength_model=1.0)
        else:
            obj.add_patches(patches, 0.3)
    e.forge_objects.unet, e.forge_objects.clip = unet, clip
    _load(clip.patcher, f.flavour)
    _load(unet, f.flavour)
    theirs = _live(f)
    patched = [*unet_patches, *clip_patches]
    assert all(not torch.equal(theirs[k], f.base[k]) for k in patched)
    differ = [k for k in patched if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} of {len(patched)} parameters differ from Forge's own LoRA, e.g. {differ[:3]}"
    assert all(torch.equal(ours[k], f.base[k]) for k in f.base if k not in patched)
