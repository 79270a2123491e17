"""Flux.1 LoRA block weights in lora-block-weight's own form: ``lbw=`` with its 61-value Flux list (and its FLUXALL
preset) gives every module of a kohya- or diffusers-named Flux LoRA the weight lora-block-weight gives it; our 58 / 57
forms (BASE, D00..D18, S00..S37) keep working, BASE standing for CLIP, T5, IN and OUT together.

The facts, from hako-mikan/sd-webui-lora-block-weight (scripts/lora_block_weight.py), written out here as data:

* its Flux list (BLOCKIDFLUX, 61 ids): CLIP, T5, IN, D00..D18, S00..S37, OUT; its preset FLUXALL is 61 ones;
* the block of a weight (its ``get_flux_blocks``) is read from the Forge patch key of the target with ``.`` turned
  into ``_``: a key with ``t5xxl`` (``t5xxl.transformer.encoder.block...``) is T5, with ``clip_``
  (``clip_l.transformer.text_model...``) CLIP; ``diffusion_model.double_blocks.N...`` is D + N (two digits),
  ``single_blocks.N`` S + N; a key with ``_in`` (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
  ``guidance_in``) IN; ``final_layer`` OUT; each weight's multiplier is the LoRA's (te for the text encoders, unet for
  the transformer) times its block's value.

The tables below say, for LoRA module names as kohya (sd-scripts) and diffusers (PEFT) write them, which Forge key
the module patches and so which block lora-block-weight gives it.
"""
from __future__ import annotations

import pytest
import torch

from lib_sdtoolkit.files import load_state_dict, save_safetensors
from lib_sdtoolkit.lora import syntax
from lib_sdtoolkit.lora.apply import ActiveNetwork
from lib_sdtoolkit.lora.blocks import PRESETS, lbw_list, resolve_block_weights
from lib_sdtoolkit.lora.network import load_network

#: lora-block-weight's BLOCKIDFLUX, written out
LBW61 = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]

#: kohya module -> (the Forge key it patches, the block lora-block-weight reads from that key)
KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "D00"),
    "lora_unet_double_blocks_7_txt_mlp_2": ("diffusion_model.double_blocks.7.txt_mlp.2.weight", "D07"),
    "lora_unet_double_blocks_18_img_mod_lin": ("diffusion_model.double_blocks.18.img_mod.lin.weight", "D18"),
    "lora_unet_single_blocks_0_linear1": ("diffusion_model.single_blocks.0.linear1.weight", "S00"),
    "lora_unet_single_blocks_12_linear2": ("diffusion_model.single_blocks.12.linear2.weight", "S12"),
    "lora_unet_single_blocks_37_modulation_lin": ("diffusion_model.single_blocks.37.modulation.lin.weight", "S37"),
    "lora_unet_img_in": ("diffusion_model.img_in.weight", "IN"),
    "lora_unet_txt_in": ("diffusion_model.txt_in.weight", "IN"),
    "lora_unet_time_in_in_layer": ("diffusion_model.time_in.in_layer.weight", "IN"),
    "lora_unet_vector_in_out_layer": ("diffusion_model.vector_in.out_layer.weight", "IN"),
    "lora_unet_guidance_in_in_layer": ("diffusion_model.guidance_in.in_layer.weight", "IN"),
    "lora_unet_final_layer_linear": ("diffusion_model.final_layer.linear.weight", "OUT"),
    "lora_unet_final_layer_adaLN_modulation_1": ("diffusion_model.final_layer.adaLN_modulation.1.weight", "OUT"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "CLIP"),
    "lora_te1_text_model_encoder_layers_11_mlp_fc2": ("clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                                                      "CLIP"),
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q":
        ("t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "T5"),
    "lora_te2_encoder_block_3_layer_1_DenseReluDense_wo":
        ("t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wo.weight", "T5"),
}

#: diffusers / PEFT module -> (the Forge key it patches, rows of a fused weight aside; the block)
DIFFUSERS = {
    "transformer.transformer_blocks.1.attn.to_q": ("diffusion_model.double_blocks.1.img_attn.qkv.weight", "D01"),
    "transformer.transformer_blocks.18.attn.add_v_proj": ("diffusion_model.double_blocks.18.txt_attn.qkv.weight",
                                                          "D18"),
    "transformer.transformer_blocks.5.ff_context.net.2": ("diffusion_model.double_blocks.5.txt_mlp.2.weight", "D05"),
    "transformer.transformer_blocks.3.norm1_context.linear": ("diffusion_model.double_blocks.3.txt_mod.lin.weight",
                                                              "D03"),
    "transformer.single_transformer_blocks.2.attn.to_k": ("diffusion_model.single_blocks.2.linear1.weight", "S02"),
    "transformer.single_transformer_blocks.30.proj_mlp": ("diffusion_model.single_blocks.30.linear1.weight", "S30"),
    "transformer.single_transformer_blocks.37.proj_out": ("diffusion_model.single_blocks.37.linear2.weight", "S37"),
    "transformer.single_transformer_blocks.9.norm.linear": ("diffusion_model.single_blocks.9.modulation.lin.weight",
                                                            "S09"),
    "transformer.x_embedder": ("diffusion_model.img_in.weight", "IN"),
    "transformer.context_embedder": ("diffusion_model.txt_in.weight", "IN"),
    "transformer.time_text_embed.timestep_embedder.linear_1": ("diffusion_model.time_in.in_layer.weight", "IN"),
    "transformer.time_text_embed.text_embedder.linear_2": ("diffusion_model.vector_in.out_layer.weight", "IN"),
    "transformer.time_text_embed.guidance_embedder.linear_1": ("diffusion_model.guidance_in.in_layer.weight", "IN"),
    "transformer.norm_out.linear": ("diffusion_model.final_layer.adaLN_modulation.1.weight", "OUT"),
    "transformer.proj_out": ("diffusion_model.final_layer.linear.weight", "OUT"),
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj":
        ("clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", "CLIP"),
    "text_encoder_2.encoder.block.1.layer.0.SelfAttention.o":
        ("t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.o.weight", "T5"),
}

#: a 61-value list with a different value in every block (some negative, some above 1)
VALUES = [round(-0.5 + 0.037 * i, 3) for i in range(61)]
SPEC61 = ",".join(f"{v:g}" for v in VALUES)
TE, UNET = 0.6, 1.3


def _lora_file(path, names, naming):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for n in names:
        dn, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
        if naming == "kohya":
            sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], sd[f"{n}.alpha"] = dn, up, torch.tensor(1.0)
        else:
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = dn, up
    save_safetensors(path, sd)
    return path


def test_the_tables_follow_lora_block_weights_key_rule():
    """The blocks written in the tables are what lora-block-weight's rule reads from each Forge key (checked here so
    that a slip in a table cannot pass unseen)."""
    import re

    for forge_key, block in list(KOHYA.values()) + list(DIFFUSERS.values()):
        k = forge_key.replace(".", "_")
        n = re.search(r"_(\d+)_", k)
        want = ("T5" if "t5xxl" in k else "CLIP" if "clip_" in k
                else f"D{int(n.group(1)):02d}" if "double_blocks" in k
                else f"S{int(n.group(1)):02d}" if "single_blocks" in k
                else "IN" if "_in" in k else "OUT" if "final_layer" in k else None)
        assert want == block, forge_key


@pytest.mark.parametrize("naming,table", [("kohya", KOHYA), ("diffusers", DIFFUSERS)])
def test_lbw61_gives_each_module_lora_block_weights_multiplier(tmp_path, naming, table):
    net = load_network(_lora_file(tmp_path / f"{naming}.safetensors", table, naming), "Flux.1")
    assert sorted(layer.weights.name for layer in net.layers) == sorted(table) and not net.unmatched
    _, reqs = syntax.parse_prompt(f"a cat <lora:x:{TE}:{UNET}:lbw={SPEC61}>")
    bw = resolve_block_weights(reqs[0].lbw, "Flux.1")
    assert list(bw) == LBW61                      # shown in lora-block-weight's order, one row per block
    active = ActiveNetwork(net, te=TE, unet=UNET, block_weights=bw)
    for layer in net.layers:
        forge_key, block = table[layer.weights.name]
        m = TE if forge_key.startswith(("clip_l.", "t5xxl.")) else UNET
        assert active.multiplier(layer) == pytest.approx(m * VALUES[LBW61.index(block)]), layer.weights.name

    # our 58 (BASE, D00..D18, S00..S37): BASE is CLIP, T5, IN and OUT at once; 57: those at 0
    d_s = VALUES[3:60]
    for spec, base in ((",".join(f"{v:g}" for v in [0.25] + d_s), 0.25), (",".join(f"{v:g}" for v in d_s), 0.0)):
        a58 = ActiveNetwork(net, te=TE, unet=UNET, block_weights=resolve_block_weights(spec, "Flux.1"))
        same61 = ",".join(f"{v:g}" for v in [base] * 3 + d_s + [base])
        a61 = ActiveNetwork(net, te=TE, unet=UNET, block_weights=resolve_block_weights(same61, "Flux.1"))
        for layer in net.layers:
            _, block = table[layer.weights.name]
            assert a58.multiplier(layer) == pytest.approx(a61.multiplier(layer)), (spec, layer.weights.name)
            if block in ("CLIP", "T5", "IN", "OUT"):
                assert a58.multiplier(layer) == pytest.approx((TE if block in ("CLIP", "T5") else UNET) * base)
    # lora-block-weight's FLUXALL preset: every module at the LoRA's weight
    assert PRESETS["FLUXALL"] == [1.0] * 61
    allw = ActiveNetwork(net, te=TE, unet=UNET, block_weights=resolve_block_weights("FLUXALL", "Flux.1"))
    assert {round(allw.multiplier(layer) / (TE if layer.component.startswith("text") else UNET), 9)
            for layer in net.layers} == {1.0}


def test_lbw61_written_back_and_refused_elsewhere():
    w = resolve_block_weights(SPEC61, "Flux.1")
    assert lbw_list(w, "Flux.1") == SPEC61       # the parts differ: only the 61 says it
    w58 = resolve_block_weights(",".join(["0.5"] * 58), "Flux.1")
    assert "CLIP" not in w58 and lbw_list(w58, "Flux.1") == ",".join(["0.5"] * 58)
    # the 61 with equal parts is written as our 58 (the same weight for every module)
    same = resolve_block_weights(",".join(["0.5"] * 61), "Flux.1")
    assert lbw_list(same, "Flux.1") == ",".join(["0.5"] * 58)
    with pytest.raises(Exception, match="61 values"):
        resolve_block_weights(SPEC61, "SDXL")


def test_bake_applies_lbw61_per_block(tmp_path):
    """Bake onto a tiny BFL Flux transformer with the 61 list: W + m * value(block) * (alpha / rank) * up @ down for
    whole (unfused) weights of IN, Dnn, Snn and OUT."""
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.samples import flux

    g = torch.Generator().manual_seed(2)
    specs = dict(flux.bfl_specs("tiny", "dev"))
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in specs.items()}
    save_safetensors(tmp_path / "flux.safetensors", base)
    mods = {"lora_unet_img_in": "img_in", "lora_unet_double_blocks_7_txt_mlp_2": "double_blocks.7.txt_mlp.2",
            "lora_unet_single_blocks_12_linear2": "single_blocks.12.linear2",
            "lora_unet_final_layer_linear": "final_layer.linear"}
    lora = {}
    for n, m in mods.items():
        o, i = specs[m + ".weight"]
        lora[f"{n}.lora_down.weight"] = torch.randn(2, i, generator=g)
        lora[f"{n}.lora_up.weight"] = torch.randn(o, 2, generator=g)
        lora[f"{n}.alpha"] = torch.tensor(1.0)
    save_safetensors(tmp_path / "l.safetensors", lora)
    out = load_state_dict(bake(tmp_path / "flux.safetensors", [(tmp_path / "l.safetensors", 0.8, SPEC61)],
                               tmp_path / "o.safetensors")["output"])
    for n, m in mods.items():
        block = KOHYA[n][1]
        want = base[m + ".weight"] + 0.8 * VALUES[LBW61.index(block)] * 0.5 * (
            lora[f"{n}.lora_up.weight"] @ lora[f"{n}.lora_down.weight"])
        torch.testing.assert_close(out[m + ".weight"], want, rtol=1e-5, atol=1e-6)


def test_editor_shows_and_writes_the_61(models_dir):
    """The Block weights editor: a 61 list is one row per lora-block-weight block; an edit of a row gives a 61 list
    that parses back to the edited table; our 58 keeps its BASE row."""
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import lbw_editor as E

    host = StandaloneHost(models_dir=models_dir)
    lora = [host.display_name(p, "lora") for p in host.list_models("lora")][0]
    st = E.editor_state(host, lora, "Flux.1", "", SPEC61, 1)
    assert [r[0] for r in st["rows"]] == LBW61 and st["lora_tag"].endswith(f":lbw={SPEC61}>")
    assert "sdtoolkit-error" not in st["message"] and "61 (CLIP, T5, IN, D00..D18, S00..S37, OUT)" in st["message"]
    rows = [list(r) for r in st["rows"]]
    rows[LBW61.index("T5")][1] = "0.125"
    new = E.spec_from_table(rows, "Flux.1", SPEC61)
    assert new is not None and len(new.split(",")) == 61
    assert resolve_block_weights(new, "Flux.1") == dict(zip(LBW61, VALUES), T5=0.125)
    st58 = E.editor_state(host, lora, "Flux.1", "", ",".join(["1"] * 58), 1)
    assert [r[0] for r in st58["rows"]][:2] == ["BASE", "D00"] and len(st58["rows"]) == 58


def test_inspect_counts_layers_per_lora_block_weight_block(tmp_path):
    """lora inspect's per-block table of a Flux LoRA: lora-block-weight's blocks, in its order."""
    from collections import Counter

    from lib_sdtoolkit.lora.inspect_lora import inspect_lora

    rep = inspect_lora(_lora_file(tmp_path / "k.safetensors", KOHYA, "kohya"))
    want = Counter(block for _, block in KOHYA.values())
    assert {b: e["layers"] for b, e in rep["blocks"].items()} == dict(want)
    assert list(rep["blocks"]) == [b for b in LBW61 if b in want]
