"""One block vocabulary (lib_sdtoolkit.arch.blocks), checked against independent references:

* sd-mecha's own supermerger-block conversions (``convert_sd1_blocks_to_ldm`` / ``convert_sdxl_blocks_to_sgm``, run
  on sd-mecha's shipped full-size key lists) and block lists (``*-supermerger_blocks.yaml``) for the merge rule;
* the real UNet layouts (generated from the real ldm / diffusers modules) for every architecture's block list and
  for lora-block-weight's "blocks with attention" lists, the refiner included;
* the SDXL refiner's ``lbw=``: each layer of a refiner LoRA (real refiner key names, tiny width) gets its block's
  weight, computed here with plain torch from the file's factors (W + m * w_block * alpha/rank * up @ down).
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from lib_sdtoolkit.arch import keymaps
from lib_sdtoolkit.arch.blocks import LBW, MBW, TABLES, block_names, convention
from lib_sdtoolkit.arch.families import FAMILIES, base_arch
from lib_sdtoolkit.arch.layouts import load_layout
from lib_sdtoolkit.errors import ArchitectureError, InvalidInputError
from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding, loaded_architecture
from lib_sdtoolkit.lora.blocks import resolve_block_weights
from lib_sdtoolkit.lora.names import lora_names
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.merge.presets import get_preset, parse_block_values

ARCHS = ["SD1", "SD2", "SDXL", "SDXL-refiner"]
UNET = "model.diffusion_model."


# ------------------------------------------------------------------------------ the merge rule vs sd-mecha
class _Builder:
    """What sd-mecha's ``map_keys`` writes into: output key -> the block id it reads."""

    class _Keys(dict):
        def __missing__(self, k):
            return k

    def __init__(self):
        self.keys = self._Keys()
        self.map = {}

    def __setitem__(self, key, value):
        self.map[key] = value


def _mecha(conv_module: str, cls: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import importlib

        mod = importlib.import_module(f"sd_mecha.extensions.builtin.model_configs.{conv_module}")
    b = _Builder()
    getattr(mod, cls).__wrapped__.map_keys(b)
    return b.map


@pytest.mark.parametrize("arch,conv_module,cls,blocks_cfg", [
    ("SD1", "convert_sd1_blocks", "convert_sd1_blocks_to_ldm", "sd1-supermerger_blocks"),
    ("SDXL", "convert_sdxl_blocks", "convert_sdxl_blocks_to_sgm", "sdxl-supermerger_blocks"),
])
def test_merge_rule_is_supermergers_as_sd_mecha_writes_it(mecha_layout, arch, conv_module, cls, blocks_cfg):
    ref_ids = [b for b in mecha_layout(blocks_cfg)["blocks"] if b != "VAE"]   # sd-mecha's extra VAE slot: our BASE
    assert block_names(arch) == ref_ids
    ref = _mecha(conv_module, cls)
    conv = convention(MBW, arch)
    assert len(ref) > 1000
    differ = {}
    for key, want in ref.items():
        got = conv.block_of(key)
        if got != want:
            differ[key] = (got, want)
    # the documented divergences only: time_embed / label_emb go to IN00 (bbc-mc, meh, supermerger) where sd-mecha
    # says BASE; sd-mecha's VAE block is part of BASE here
    for key, (got, want) in differ.items():
        if want == "VAE":
            assert key.startswith("first_stage_model.") and got == "BASE", key
        else:
            assert re.match(r"model\.diffusion_model\.(time_embed|label_emb)\.", key) and (got, want) == ("IN00", "BASE"), key
    assert any(want == "BASE" for _, want in differ.values())


# ------------------------------------------------------------------------------ block lists vs the real layouts
def _layout_blocks(arch):
    """(input block indexes, output block indexes, blocks holding attention) read from the real UNet layout."""
    keys = [k[len(UNET):] for k in load_layout(arch) if k.startswith(UNET)]
    ins = sorted({int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")})
    outs = sorted({int(k.split(".")[1]) for k in keys if k.startswith("output_blocks.")})
    attn = set()
    for k in keys:
        if ".transformer_blocks." in k:
            head = k.split(".")
            attn.add("M00" if head[0] == "middle_block" else
                     ("IN" if head[0] == "input_blocks" else "OUT") + f"{int(head[1]):02d}")
    return ins, outs, attn


@pytest.mark.parametrize("arch", ARCHS)
def test_block_lists_follow_the_real_unet(arch):
    ins, outs, attn = _layout_blocks(arch)
    assert ins == list(range(len(ins))) and outs == list(range(len(outs)))
    every = ["BASE"] + [f"IN{i:02d}" for i in ins] + ["M00"] + [f"OUT{i:02d}" for i in outs]
    for name in (MBW, LBW):
        assert block_names(arch, name) == every
    lbw = convention(LBW, arch)
    short = min(lbw.lists)
    assert list(lbw.lists[short]) == [b for b in every if b == "BASE" or b in attn], \
        "the short lora-block-weight list is BASE + the blocks that carry attention"
    assert lbw.lists[len(every)] == tuple(every)
    mbw = convention(MBW, arch)
    assert set(mbw.lists) == {len(every), len(every) - 1}
    # every key of the real checkpoint has a block, and every block holds keys
    seen = {mbw.block_of(k) for k in load_layout(arch)}
    assert seen == set(every)


def test_lora_block_weight_lists_are_the_extensions():
    """lora-block-weight's BLOCKID17 / BLOCKID12 (REFERENCE/lora-controlnet-anchors.md 2.2)."""
    assert convention(LBW, "SD1").lists[17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                               *[f"OUT{i:02d}" for i in range(3, 12)])
    assert convention(LBW, "SDXL").lists[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                                                *[f"OUT{i:02d}" for i in range(6)])
    assert convention(LBW, "SDXL-refiner").lists[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                                                        *[f"OUT{i:02d}" for i in range(3, 9)])


@pytest.mark.parametrize("arch", ARCHS)
def test_lbw_rule_on_every_lora_target(arch):
    conv = convention(LBW, arch)
    blocks = {}
    for name, t in lora_names(arch).items():
        b = conv.block_of(t.module)
        blocks.setdefault(b, set()).add(name)
        if not t.module.startswith(UNET):
            assert b == "BASE", name                                   # text encoders weigh with BASE
        elif re.match(r"model\.diffusion_model\.(time_embed|label_emb|out)\.", t.module):
            assert b == "BASE", name                                   # UNet layers outside the numbered blocks
    assert set(blocks) == set(conv.blocks)
    if arch == "SDXL-refiner":
        assert "lora_unet_input_blocks_10_0_in_layers_2" in blocks["IN10"]
        assert "lora_unet_output_blocks_11_0_skip_connection" in blocks["OUT11"]


def test_one_base_arch_and_one_prefix_table():
    assert base_arch("SDXL-refiner") == "SDXL-refiner" and base_arch("SD1-inpainting") == "SD1"
    with pytest.raises(ValueError):
        base_arch("Flux")
    for arch in ARCHS:
        layout = load_layout(arch)
        for te in FAMILIES[arch].text_encoders:                       # every prefix names real keys
            assert any(k.startswith(te.prefix) for k in layout), (arch, te)
            assert te.prefix.startswith(te.root)
        assert keymaps.TEXT_PREFIXES[arch] == [(te.component, te.prefix, te.layout)
                                               for te in FAMILIES[arch].text_encoders]
    for name in (MBW, LBW):  # the SD families, and Flux.1 (blocks of its own; no SD text-encoder table)
        assert set(TABLES[name]) == set(FAMILIES) | {"Flux.1"}
    with pytest.raises(ArchitectureError, match="no LoRA blocks"):
        convention(LBW, "VAE")


def test_a_key_of_a_block_the_architecture_lacks_is_an_error():
    with pytest.raises(ArchitectureError, match="IN10"):
        convention(MBW, "SDXL").block_of(UNET + "input_blocks.10.0.in_layers.0.weight")


# ------------------------------------------------------------------------------ merge ratios for the refiner
def test_refiner_merge_lists_and_presets():
    vals = [round(0.01 * i, 3) for i in range(26)]
    base, unet = parse_block_values(vals, "SDXL-refiner")
    assert base == 0.0 and unet == vals[1:]
    with pytest.raises(InvalidInputError, match="expected 25"):
        parse_block_values(vals[:20], "SDXL-refiner")
    _, sd1 = get_preset("GRAD_V", "SD1")
    _, ref = get_preset("GRAD_V", "SDXL-refiner")
    _, xl = get_preset("GRAD_V", "SDXL")
    assert ref == sd1 and len(xl) == 19 and xl == sd1[:9] + sd1[12:22]


# ------------------------------------------------------------------------------ lbw= on a refiner LoRA
#: kohya (sgm) refiner name -> (diffusers parameter of the tiny refiner's UNet / CLIP-G, its block), written out
#: by hand: refiner levels 0-3 = input_blocks 1-2 / 4-5 / 7-8 / 10-11 (downsamplers 3, 6, 9), up_blocks.N = output
#: blocks 3N..3N+2; resnet in_layers.2 = conv1, out_layers.3 = conv2, skip_connection = conv_shortcut
REFINER = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "IN04", 4, 2.0),
    "lora_unet_input_blocks_9_0_op": ("unet", "down_blocks.2.downsamplers.0.conv.weight", "IN09", 4, 4.0),
    "lora_unet_input_blocks_10_0_in_layers_2": ("unet", "down_blocks.3.resnets.0.conv1.weight", "IN10", 4, 4.0),
    "lora_unet_input_blocks_11_0_out_layers_3": ("unet", "down_blocks.3.resnets.1.conv2.weight", "IN11", 2, 1.0),
    "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in.weight", "M00", 4, 4.0),
    "lora_unet_output_blocks_2_1_conv": ("unet", "up_blocks.0.upsamplers.0.conv.weight", "OUT02", 4, 4.0),
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k":
        ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight", "OUT05", 4, 2.0),
    "lora_unet_output_blocks_9_0_in_layers_2": ("unet", "up_blocks.3.resnets.0.conv1.weight", "OUT09", 4, 4.0),
    "lora_unet_output_blocks_11_0_skip_connection":
        ("unet", "up_blocks.3.resnets.2.conv_shortcut.weight", "OUT11", 4, 4.0),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1":
        ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1.weight", "BASE", 4, 4.0),
}
#: one weight per block of the refiner's 26 (BASE, IN00..IN11, M00, OUT00..OUT11), all different
LBW26 = [round(0.3 + 0.025 * i, 3) for i in range(26)]
REFINER_IDS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def refiner_lora(path, params, seed=11):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (comp, pname, _, rank, alpha) in REFINER.items():
        w = params[comp][pname]
        down = (rank, *w.shape[1:]) if w.dim() == 4 else (rank, w.shape[1])
        up = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
        sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return save_safetensors(path, sd), sd


def refiner_expected(base, sd, weights, te, unet):
    """W + m * w_block * alpha/rank * up @ down in float64, per (component, parameter)."""
    out = {}
    for name, (comp, pname, block, rank, alpha) in REFINER.items():
        up = sd[f"{name}.lora_up.weight"].double().reshape(-1, rank)
        down = sd[f"{name}.lora_down.weight"].double().reshape(rank, -1)
        m = (te if comp.startswith("text") else unet) * weights[block]
        w = base[comp][pname].double()
        out[(comp, pname)] = (w + m * alpha / rank * (up @ down).reshape(w.shape)).float()
    return out


@pytest.fixture(scope="module")
def refiner(tiny_modules):
    mods = tiny_modules("SDXL-refiner")
    params = {c: dict(mods[c].named_parameters()) for c in ("unet", "text_encoder_2")}
    base = {c: {k: v.detach().clone() for k, v in p.items()} for c, p in params.items()}
    return mods, params, base


@pytest.mark.parametrize("lbw,weights", [
    (",".join(map(str, LBW26)), dict(zip(REFINER_IDS, LBW26))),
    # the refiner's 12 = its blocks with attention; the others 0 (as lora-block-weight expands short lists)
    ("0.5,0.4,0.45,0.35,0.3,0.2,0.25,0.15,0.6,0.65,0.7,0.75",
     {**{b: 0.0 for b in REFINER_IDS}, **dict(zip(["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                                  "OUT05", "OUT06", "OUT07", "OUT08"],
                                                 [0.5, 0.4, 0.45, 0.35, 0.3, 0.2, 0.25, 0.15, 0.6, 0.65, 0.7, 0.75]))}),
])
def test_refiner_lbw_gives_every_block_its_weight(refiner, tmp_path, lbw, weights):
    mods, params, base = refiner
    path, sd = refiner_lora(tmp_path / "refiner.safetensors", params)
    net = load_network(path, "SDXL-refiner")
    assert not net.unmatched and len(net.layers) == len(REFINER)
    assert {layer.weights.name: layer.block for layer in net.layers} == {n: v[2] for n, v in REFINER.items()}
    bw = resolve_block_weights(lbw, "SDXL-refiner")
    assert bw == weights
    binding = ModelBinding.from_parts("SDXL-refiner", unet=mods["unet"], text_encoder_2=mods["text_encoder_2"])
    p = LoraPatcher(binding)
    try:
        p.set_networks([ActiveNetwork(net, te=0.7, unet=0.9, block_weights=bw)])
        want = refiner_expected(base, sd, weights, 0.7, 0.9)
        for comp, pname, block, _, _ in REFINER.values():
            torch.testing.assert_close(params[comp][pname].detach(), want[(comp, pname)], rtol=1e-6, atol=1e-6,
                                       msg=pname)
            assert torch.equal(params[comp][pname], base[comp][pname]) == (weights[block] == 0.0), pname
        for comp, ps in params.items():                                # nothing else moved
            for k, v in ps.items():
                if (comp, k) not in want:
                    assert torch.equal(v, base[comp][k]), k
    finally:
        p.restore_all()
    assert all(torch.equal(v, base[c][k]) for c, ps in params.items() for k, v in ps.items())


def test_refiner_refuses_sdxl_base_lists():
    """A 20-value list names SDXL-base blocks (IN00..IN08, OUT00..OUT08): on a refiner it would leave IN09-IN11 and
    OUT09-OUT11 at 0, so it is refused with the lengths the refiner takes."""
    with pytest.raises(InvalidInputError, match=r"SDXL-refiner model takes 12 or 26"):
        resolve_block_weights(",".join(["1"] * 20), "SDXL-refiner")
    with pytest.raises(InvalidInputError, match="12 or 20"):
        resolve_block_weights(",".join(["1"] * 26), "SDXL")
    assert resolve_block_weights("ALL", "SDXL-refiner") == {b: (1.0 if b in convention(LBW, "SDXL-refiner").lists[12]
                                                               else 0.0) for b in REFINER_IDS}


# ------------------------------------------------------------------------------ which model is loaded
@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_architecture_from_names_and_shapes(arch):
    layout = load_layout(arch)
    # the WebUI's sd_model: checkpoint names, text encoders under the hijack's ``wrapped``
    hijacked = [(re.sub(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.", r"\1.wrapped.", k), s)
                for k, s in layout.items()]
    assert loaded_architecture(hijacked) == arch
    # Forge: the UNet patcher's model holds ``diffusion_model.*``; its UNet alone tells the architecture
    forge = [(k[len("model."):], s) for k, s in layout.items() if k.startswith(UNET)]
    assert loaded_architecture(forge, prefix="model.") == arch


def test_loaded_architecture_is_none_for_what_it_does_not_know():
    assert loaded_architecture([("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", (9, 3))]) is None
    assert loaded_architecture([]) is None
