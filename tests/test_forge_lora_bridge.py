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
