"""Architecture detection, components, merge blocks and `inspect`, on files built from the real modules.

Component key counts are checked against the real modules' own ``state_dict()`` keys (ldm UNetModel, the
ldm VAE, transformers CLIP; diffusers for SDXL), not against our own tables.
"""
from __future__ import annotations

import json

import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.arch import block_names, block_of_key, detect, position_ids_state, split_components
from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.inspect import format_report, inspect_file
from lib_sdtoolkit.samples import factory

ARCHS = ["SD1", "SD2", "SDXL", "SDXL-refiner"]


#: this module's names -> the session's fixture files (conftest.FIXTURE_SPECS): the same arguments this module
#: used to write again into its own folder (seed 0; fp16 checkpoints; the dirty SD1 .ckpt; both VAE forms), so
#: each file is built once per session and shared with the other modules that read it.
_SHARED = {"SD1": "sd1_fp16", "SD2": "sd2", "SDXL": "sdxl", "SDXL-refiner": "sdxl_refiner",
           "SD1-inpainting": "sd1_inpainting", "SD1-pix2pix": "sd1_ip2p", "SD1-dirty": "sd1_ema_junk_ckpt",
           "VAE-bare": "vae", "VAE-prefixed": "vae_prefixed_pt"}


@pytest.fixture(scope="module")
def files(fixture_files):
    """Read-only inputs (the session files are chmod 444; every test here only inspects them)."""
    return {name: fixture_files[spec] for name, spec in _SHARED.items()}


@pytest.fixture(scope="module")
def module_key_counts(tiny_modules):
    """Key counts straight from the real modules' state_dict() (``tiny_modules(arch)`` is the session's cached
    ``factory.build_modules(arch)``: same width, seed and classes)."""
    counts = {}
    for arch in ARCHS:
        mods = tiny_modules(arch)
        c = {"unet": len(mods["unet"].state_dict()), "vae": len(mods["vae"].state_dict())}
        for spec in factory.get_config(arch).text_encoders:
            te = spec.component
            if te in mods:
                sd = mods[te].state_dict()
                # transformers >= 4.31 no longer saves position_ids; real SD1/SDXL CLIP-L checkpoints have them
                n = len([k for k in sd if not k.endswith("position_ids")])
                hf_clip_l = spec.layout == "hf"
                # OpenCLIP layout fuses q/k/v: their 6 HF tensors per layer become 2 (in_proj weight/bias),
                # and a projection comes with a logit_scale
                layers = mods[te].config.num_hidden_layers
                if not hf_clip_l:
                    n = n - 4 * layers + (1 if "text_projection.weight" in sd else 0)
                c[te] = n + (1 if hf_clip_l else 0)
        counts[arch] = c
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_detects_and_counts_components(files, module_key_counts, arch):
    rep = inspect_file(files[arch])
    assert rep["architecture"] == arch
    assert rep["variant"] is None
    got = {k: v["keys"] for k, v in rep["components"].items()}
    assert got == module_key_counts[arch], (got, module_key_counts[arch])
    assert rep["junk"] == [] and rep["ema"] == {"keys": 0, "bytes": 0}
    assert rep["position_ids"] == ("missing" if arch in ("SD2", "SDXL-refiner") else "ok")
    assert rep["total_bytes"] == sum(c["bytes"] for c in rep["components"].values())
    assert rep["format"] == "safetensors" and rep["dtypes"]["float16"]["keys"] > 0


def test_variants(files):
    assert inspect_file(files["SD1-inpainting"])["variant"] == "inpainting"
    assert inspect_file(files["SD1-pix2pix"])["variant"] == "instruct-pix2pix"
    assert inspect_file(files["SD1-inpainting"])["architecture"] == "SD1"


def test_ema_junk_and_broken_position_ids(files, module_key_counts, tiny_modules):
    rep = inspect_file(files["SD1-dirty"])
    assert rep["architecture"] == "SD1" and rep["format"] == "ckpt"
    # every UNet parameter has a dot-less EMA copy, plus decay and num_updates
    unet_params = len([k for k in tiny_modules("SD1")["unet"].state_dict()])
    assert rep["ema"]["keys"] == unet_params + 2
    assert rep["components"]["unet"]["keys"] == module_key_counts["SD1"]["unet"]
    assert "betas" in rep["junk"] and "alphas_cumprod" in rep["junk"]
    assert any(k.startswith("loss.") for k in rep["junk"])
    assert rep["position_ids"] == "broken"
    assert rep["position_ids_detail"]["dtype"] == "float32" and 76 in rep["position_ids_detail"]["wrong"]
    assert rep["fp16_savings_bytes"] > 0 and rep["pruned_fp16_bytes"] < rep["pruned_bytes"]
    text = format_report(rep)
    assert "broken" in text and "pruning would leave" in text and "ema" in text


def test_vae_files(files, tiny_modules):
    for name in ("VAE-bare", "VAE-prefixed"):
        rep = inspect_file(files[name])
        assert rep["architecture"] == "VAE", name
        assert rep["components"]["vae"]["keys"] == len(tiny_modules("SD1")["vae"].state_dict())
        assert rep["junk"] == []


def test_lora_and_controlnet_files(tmp_path):
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
    }
    p = save_safetensors(tmp_path / "l.safetensors", lora)
    rep = inspect_file(p)
    assert rep["architecture"] == "LoRA"
    assert rep["components"] == {"unet": {"keys": 3, "bytes": 2 * 4 * 320 * 4 + 4},
                                 "text_encoder": {"keys": 3, "bytes": (4 * 768 + 3072 * 4) * 4 + 4}}
    cn = {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
          "control_model.zero_convs.0.0.weight": torch.zeros(4, 4, 1, 1),
          "control_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    assert inspect_file(save_safetensors(tmp_path / "c.safetensors", cn))["architecture"] == "ControlNet"
    assert detect({"foo.bar": (1,)}).architecture == "unknown"


def test_unet_only_files_are_told_from_structure():
    for arch in ARCHS:
        sd = factory.build_state_dict(arch)
        unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        info = detect(unet)
        assert info.architecture == arch and info.notes


def test_block_of_every_real_unet_key():
    for arch, n in (("SD1", 12), ("SD2", 12), ("SDXL", 9)):
        keys = [k for k in factory.build_state_dict(arch) if k.startswith("model.diffusion_model.")]
        names = block_names(arch)
        assert len(names) == 2 * n + 2 and names[0] == "BASE"
        seen = {block_of_key(k, arch) for k in keys}
        assert seen <= set(names)
        assert seen == set(names) - {"BASE"}, "every UNet block holds keys; no UNet key is left in BASE"
    assert block_of_key("model.diffusion_model.time_embed.0.weight", "SD1") == "IN00"
    assert block_of_key("model.diffusion_model.label_emb.0.0.weight", "SDXL") == "IN00"
    assert block_of_key("model.diffusion_model.out.2.weight", "SD1") == "OUT11"
    assert block_of_key("model.diffusion_model.out.2.weight", "SDXL") == "OUT08"
    assert block_of_key("model.diffusion_model.input_blocks.11.0.in_layers.0.weight", "SD1") == "IN11"
    assert block_of_key("model.diffusion_model.output_blocks.2.1.conv.weight", "SD1") == "OUT02"
    assert block_of_key("model.diffusion_model.middle_block.1.proj_in.weight", "SD2") == "M00"
    assert block_of_key("first_stage_model.decoder.conv_out.weight", "SD1") == "BASE"
    assert block_of_key("cond_stage_model.transformer.text_model.final_layer_norm.weight", "SD1") == "BASE"


def test_position_ids_states():
    assert position_ids_state(torch.arange(77).reshape(1, 77))["state"] == "ok"
    assert position_ids_state(None)["state"] == "missing"
    broken = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    broken[0, 76] = 75.9975
    st = position_ids_state(broken)
    assert st["state"] == "broken" and st["wrong"] == [76]
    # a float tensor with exact values is still broken (merges will drift it), but has no wrong index
    st = position_ids_state(torch.arange(77, dtype=torch.float32).reshape(1, 77))
    assert st["state"] == "broken" and st["wrong"] == []


def test_cli_json(files, capsys):
    assert cli.main(["inspect", str(files["SDXL"]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for field in ("architecture", "format", "components", "ema", "junk", "position_ids", "total_bytes"):
        assert field in rep
    assert rep["architecture"] == "SDXL"
    assert set(rep["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert cli.main(["inspect", str(files["SD1-dirty"])]) == 0
    assert "architecture: SD1" in capsys.readouterr().out


def test_split_components_covers_every_key(files):
    sd = factory.build_state_dict("SD1", ema=True, junk=True)
    info = detect(sd)
    groups = split_components(sd, info)
    assert sorted(k for ks in groups.values() for k in ks) == sorted(sd)


def test_junk_inside_a_component_prefix_and_old_clip_names():
    sd = factory.build_state_dict("SD1")
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(2)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    # the old SD1 (NAI-era) CLIP layout without `text_model.` is still the text encoder
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd.items()}
    for d in (sd, old):
        groups = split_components(d, detect(d))
        assert sorted(groups["junk"]) == ["first_stage_model.loss.logvar", "model.diffusion_model.bogus.weight"]
        assert len(groups["text_encoder"]) == 197
