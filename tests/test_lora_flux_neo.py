"""Flux.1 LoRA names that only ComfyUI's key map - the one Forge Neo vendors - knows, read by our name reader.

Neo's ``modules_forge/packages/comfy/lora.py`` (ComfyUI v0.3.77's, and the later v0.26.1 copy) maps, for a Flux
model, ``diffusion_model.single_blocks.N.linear1_qkv`` to ``(diffusion_model.single_blocks.N.linear1.weight,
(0, 0, hidden_size * 3))``: the q|k|v rows of the fused ``linear1``, the mlp rows untouched. Its
``model_lora_keys_clip`` gives T5-XXL (``t5xxl.transformer.*``) the kohya names ``lora_te2_...`` and ``lora_te3_...``
when CLIP-L is present (Forge 2.0.1's comfyui collection maps ``lora_te3_`` too). Such files are written by hand
converters and by ComfyUI's own USO/XLabs conversion; before this, ``lora inspect`` listed those modules as
matching nothing and bake/convert refused them.

Checks: real safetensors files with those names; ``inspect`` names the naming and lists nothing unmatched; bake onto
an all-in-one checkpoint equals plain torch (W[:3h] += s·(alpha/r)·B@A, the mlp rows and every other key
bit-identical); convert to kohya keeps the network (its bake gives the same bits).
"""
from __future__ import annotations

import torch

from lib_sdtoolkit.files import load_state_dict, save_safetensors
from lib_sdtoolkit.samples import flux

H = 32   # tiny hidden width (lib_sdtoolkit.samples.flux "tiny")
R = 4
T5K = "encoder.block.5.layer.0.SelfAttention.k"


def _neo_file(path):
    g = torch.Generator().manual_seed(21)
    sd = {}

    def add(name, o, i, alpha):
        sd[f"{name}.lora_A.weight"] = torch.randn(R, i, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(o, R, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    add("diffusion_model.single_blocks.5.linear1_qkv", 3 * H, H, 2.0)
    add("diffusion_model.single_blocks.37.linear1_qkv", 3 * H, H, 4.0)
    add("diffusion_model.double_blocks.2.img_attn.qkv", 3 * H, H, 2.0)
    sd[f"lora_te3_{T5K.replace('.', '_')}.lora_down.weight"] = torch.randn(R, H, generator=g) * 0.3
    sd[f"lora_te3_{T5K.replace('.', '_')}.lora_up.weight"] = torch.randn(H, R, generator=g) * 0.3
    sd[f"lora_te3_{T5K.replace('.', '_')}.alpha"] = torch.tensor(1.0)
    save_safetensors(path, sd)
    return sd


def _aio(path):
    """An all-in-one Flux dev checkpoint (ComfyUI/Forge layout): transformer + CLIP-L + T5-XXL."""
    g = torch.Generator().manual_seed(22)
    sd = {"model.diffusion_model." + k: torch.randn(s, generator=g) * 0.2 for k, s in flux.bfl_specs("tiny", "dev")}
    for comp, pre in (("clip_l", "text_encoders.clip_l.transformer."), ("t5xxl", "text_encoders.t5xxl.transformer.")):
        sd.update({pre + k: torch.randn(s, generator=g) * 0.1 for k, s in flux.component_specs(comp)})
    save_safetensors(path, sd)
    return sd


def test_neo_names_inspect_bake_and_convert(tmp_path):
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.convert import convert
    from lib_sdtoolkit.lora.detect import describe
    from lib_sdtoolkit.lora.inspect_lora import inspect_lora

    lora = _neo_file(tmp_path / "neo.safetensors")
    d = describe(tmp_path / "neo.safetensors")
    assert d["arch"] == "Flux.1" and d["naming"] == "comfy", d
    assert d["unmatched"] == [], d["unmatched"]
    info = inspect_lora(tmp_path / "neo.safetensors")
    assert info["naming"] == "comfy" and info["unmatched_modules"] == []
    assert info["targets"] == {"transformer": 3, "text_encoder_2": 1}, info["targets"]

    base = _aio(tmp_path / "aio.safetensors")
    out = load_state_dict(bake(tmp_path / "aio.safetensors", [(tmp_path / "neo.safetensors", 0.8)],
                               tmp_path / "baked.safetensors")["output"])
    want = {}
    for n, alpha in ((5, 2.0), (37, 4.0)):
        k = f"model.diffusion_model.single_blocks.{n}.linear1.weight"
        m = f"diffusion_model.single_blocks.{n}.linear1_qkv"
        w = base[k].clone()
        w[:3 * H] += 0.8 * (alpha / R) * (lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"])
        want[k] = w
    m = "diffusion_model.double_blocks.2.img_attn.qkv"
    k = "model.diffusion_model.double_blocks.2.img_attn.qkv.weight"
    want[k] = base[k] + 0.8 * (2.0 / R) * (lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"])
    t = f"lora_te3_{T5K.replace('.', '_')}"
    k = f"text_encoders.t5xxl.transformer.{T5K}.weight"
    want[k] = base[k] + 0.8 * (1.0 / R) * (lora[f"{t}.lora_up.weight"] @ lora[f"{t}.lora_down.weight"])
    assert out.keys() == base.keys()
    for k, v in out.items():
        if k in want:
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, base[k]), k
    for n in (5, 37):   # the mlp rows of linear1 are not the LoRA's
        k = f"model.diffusion_model.single_blocks.{n}.linear1.weight"
        assert torch.equal(out[k][3 * H:], base[k][3 * H:]) and not torch.equal(out[k][:3 * H], base[k][:3 * H])

    # on an SD model the refusal names a whole module of the file, not just its first dotted word
    import pytest

    from lib_sdtoolkit.errors import ArchitectureError
    from lib_sdtoolkit.lora.network import load_network

    with pytest.raises(ArchitectureError, match=r"'diffusion_model\.(single|double)_blocks\.\d+\.[a-z_.0-9]+'.*"
                                                 r"this is a Flux\.1 network and the model is SD1"):
        load_network(tmp_path / "neo.safetensors", "SD1")

    conv = convert(tmp_path / "neo.safetensors", tmp_path / "neo-kohya.safetensors", "kohya")
    assert conv["source_naming"] == "comfy"
    ksd = load_state_dict(tmp_path / "neo-kohya.safetensors")
    assert "lora_unet_single_blocks_5_linear1.lora_up.weight" in ksd
    again = load_state_dict(bake(tmp_path / "aio.safetensors", [(tmp_path / "neo-kohya.safetensors", 0.8)],
                                 tmp_path / "baked2.safetensors")["output"])
    assert all(torch.equal(again[k], out[k]) for k in out)
