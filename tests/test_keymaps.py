"""Key maps checked against independent references: the real diffusers / ldm / transformers modules (names, shapes
and forward outputs), torch's own fused-qkv attention, and sd-mecha's published key lists."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from lib_sdtoolkit.arch import keymaps
from lib_sdtoolkit.arch.layouts import load_layout
from lib_sdtoolkit.samples import factory

UNET_ARCHS = ["SD1", "SD2", "SDXL", "SDXL-refiner"]


def _unet_layout(arch):
    return {k[len(keymaps.UNET_PREFIX):]: v for k, v in load_layout(arch).items() if k.startswith(keymaps.UNET_PREFIX)}


@pytest.mark.parametrize("arch", UNET_ARCHS)
def test_unet_map_matches_real_diffusers_module_and_round_trips(arch):
    ldm = _unet_layout(arch)
    mapped = keymaps.unet_ldm_to_diffusers_keys(ldm, arch)
    # the real diffusers module (full width, meta device): same names, same shapes
    real = {k: tuple(v.shape) for k, v in factory.build_diffusers_unet(arch, "full", device="meta").state_dict().items()}
    assert sorted(mapped.values()) == sorted(real)
    assert all(real[d] == ldm[l] for l, d in mapped.items())
    assert len(set(mapped.values())) == len(mapped)
    back = keymaps.unet_diffusers_to_ldm_keys(mapped.values(), arch)
    assert all(back[d] == l for l, d in mapped.items())


def test_unet_map_spot_checks():
    f = keymaps.unet_ldm_key_to_diffusers
    assert f("input_blocks.3.0.op.weight", "SD1") == "down_blocks.0.downsamplers.0.conv.weight"
    assert f("input_blocks.4.0.skip_connection.weight", "SD1") == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert f("output_blocks.2.1.conv.bias", "SD1") == "up_blocks.0.upsamplers.0.conv.bias"
    assert f("output_blocks.5.2.conv.weight", "SD1") == "up_blocks.1.upsamplers.0.conv.weight"
    assert f("middle_block.1.proj_in.weight", "SD2") == "mid_block.attentions.0.proj_in.weight"
    assert f("label_emb.0.2.weight", "SDXL") == "add_embedding.linear_2.weight"
    assert f("input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", "SDXL") == \
        "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.weight"
    assert f("output_blocks.8.0.emb_layers.1.weight", "SDXL") == "up_blocks.2.resnets.2.time_emb_proj.weight"
    for bad, arch in [("input_blocks.12.0.op.weight", "SD1"), ("input_blocks.1.1.proj_in.weight", "SDXL"),
                      ("output_blocks.8.1.conv.weight", "SDXL"), ("foo.weight", "SD1")]:
        with pytest.raises(KeyError):
            f(bad, arch)


@pytest.mark.parametrize("arch", ["SD1", "SD2"])
def test_diffusers_unet_converted_to_ldm_gives_same_output(arch):
    torch.manual_seed(0)
    dunet = factory.build_diffusers_unet(arch, "tiny")
    with torch.no_grad():  # default init zeroes the output convs; make every weight count
        for p in dunet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ldm_sd = keymaps.convert_unet_diffusers_to_ldm(dunet.state_dict(), arch, prefix="")
    lunet = factory.build_ldm_unet(arch, "tiny")
    lunet.load_state_dict(ldm_sd, strict=True)
    ctx_dim = factory.tiny_config(arch).ldm_unet["context_dim"]
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, ctx_dim)
    with torch.no_grad():
        a = dunet(x, t, encoder_hidden_states=ctx).sample
        b = lunet(x, timesteps=t, context=ctx)
    assert a.abs().mean() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # and back: ldm -> diffusers restores the diffusers state dict
    again = keymaps.convert_unet_ldm_to_diffusers({keymaps.UNET_PREFIX + k: v for k, v in ldm_sd.items()}, arch)
    assert again.keys() == dunet.state_dict().keys()


def test_vae_map_against_real_modules_and_outputs():
    torch.manual_seed(1)
    dvae = factory.build_diffusers_vae("tiny")
    with torch.no_grad():
        for p in dvae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ldm_sd = keymaps.convert_vae_diffusers_to_ldm(dvae.state_dict())
    lvae = factory.build_ldm_vae("tiny")
    lvae.load_state_dict(ldm_sd, strict=True)
    assert ldm_sd["decoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1)
    x = torch.randn(1, 3, 32, 32)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(lvae.encode_moments(x), dvae.encode(x).latent_dist.parameters, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lvae.decode(z), dvae.decode(z).sample, rtol=1e-4, atol=1e-5)
    back = keymaps.convert_vae_ldm_to_diffusers({"first_stage_model." + k: v for k, v in ldm_sd.items()},
                                                prefix="first_stage_model.")
    assert back.keys() == dvae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in dvae.state_dict().items())


def test_vae_map_against_sd_mecha_kohya_list(mecha_layout):
    # sd-mecha's sd1-kohya config lists the diffusers-named VAE of a full SD1.5 model
    ref = {k[len("vae."):]: tuple(v["shape"]) for k, v in mecha_layout("sd1-kohya")["vae"].items()}
    ours = {keymaps.vae_ldm_key_to_diffusers(k): s for k, s in load_layout("VAE").items()}
    assert ours.keys() == ref.keys()
    # attention weights are linear [C, C] there, 1x1 conv [C, C, 1, 1] in ldm
    for k, s in ours.items():
        assert ref[k] == (s[:2] if len(s) == 4 and ".mid_block.attentions." in k else s), k


def test_unet_map_against_sd_mecha_diffusers_lists(mecha_layout):
    ref1 = {k[len("unet."):]: tuple(v["shape"]) for k, v in mecha_layout("sd1-kohya")["diffuser"].items()}
    ours1 = {keymaps.unet_ldm_key_to_diffusers(k, "SD1"): s for k, s in _unet_layout("SD1").items()}
    assert ours1 == ref1
    refxl = {k[len("unet."):]: tuple(v["shape"]) for k, v in mecha_layout("sdxl-kohya_but_diffusers")["diffuser"].items()}
    oursxl = {keymaps.unet_ldm_key_to_diffusers(k, "SDXL"): s for k, s in _unet_layout("SDXL").items()}
    assert oursxl == refxl


def _openclip_text_forward(oc, ids, heads):
    """OpenCLIP's text tower in plain torch; attention via torch's fused-qkv multi_head_attention_forward."""
    x = oc["token_embedding.weight"][ids] + oc["positional_embedding"]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    layers = sorted({int(k.split(".")[2]) for k in oc if k.startswith("transformer.resblocks.")})
    w = x.shape[-1]
    for i in layers:
        p = lambda name: oc[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (w,), p("ln_1.weight"), p("ln_1.bias")).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(h, h, h, w, heads, p("attn.in_proj_weight"), p("attn.in_proj_bias"),
                                              None, None, False, 0.0, p("attn.out_proj.weight"),
                                              p("attn.out_proj.bias"), need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"),
                         p("mlp.c_proj.bias"))
    x = F.layer_norm(x, (w,), oc["ln_final.weight"], oc["ln_final.bias"])
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ oc["text_projection"]
    return x, pooled


@pytest.mark.parametrize("arch", ["SD2", "SDXL"])
def test_openclip_from_hf_matches_independent_forward(arch):
    spec = [s for s in factory.tiny_config(arch).text_encoders if s.layout == "openclip"][0]
    torch.manual_seed(2)
    hf = factory.build_text_encoder(spec)
    oc = keymaps.openclip_from_hf(hf.state_dict(), logit_scale=torch.tensor(4.6052))
    # names and shapes of the full-width layout
    full = {k[len(spec.prefix):]: s for k, s in load_layout(arch).items() if k.startswith(spec.prefix)}
    assert set(oc) == set(full)
    vocab = spec.config["vocab_size"]
    ids = torch.randint(0, vocab - 2, (2, 77))
    ids[0, 10], ids[1, 76] = vocab - 1, vocab - 1  # EOS: the highest id, as OpenCLIP pools on argmax
    ids[0, 11:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids)
        x, pooled = _openclip_text_forward(oc, ids, spec.config["num_attention_heads"])
    torch.testing.assert_close(x, out.last_hidden_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=1e-4, atol=1e-5)
    back = keymaps.hf_from_openclip(oc)
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_openclip_g_layout_against_sd_mecha_kohya_te2(mecha_layout):
    ref = {k[len("te2."):]: tuple(v["shape"]) for k, v in mecha_layout("sdxl-kohya")["clip_g"].items()}
    prefix = "conditioner.embedders.1.model."
    oc = {k[len(prefix):]: torch.empty(s, device="meta") for k, s in load_layout("SDXL").items() if k.startswith(prefix)}
    hf = {k: tuple(v.shape) for k, v in keymaps.hf_from_openclip(oc).items()}
    ref.pop("text_model.embeddings.position_ids", None)
    assert hf == ref


def test_kohya_names_sd1():
    t = keymaps.ldm_module_of_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "SD1")
    assert t == keymaps.LoraTarget("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", "unet")
    t = keymaps.ldm_module_of_kohya("lora_unet_up_blocks_3_attentions_2_proj_out", "SD1")
    assert t.module == "model.diffusion_model.output_blocks.11.1.proj_out"
    t = keymaps.ldm_module_of_kohya("lora_te_text_model_encoder_layers_11_mlp_fc2", "SD1")
    assert t == keymaps.LoraTarget("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2", "text_encoder")
    assert keymaps.kohya_name_of_module("model.diffusion_model.middle_block.1.proj_in", "SD1") == \
        "lora_unet_mid_block_attentions_0_proj_in"


def test_kohya_names_sdxl_and_openclip():
    t = keymaps.ldm_module_of_kohya("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "SDXL")
    assert t.module == "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    # diffusers spelling of the same module
    assert keymaps.ldm_module_of_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
                                       "SDXL") == t
    t = keymaps.ldm_module_of_kohya("lora_te2_text_model_encoder_layers_31_self_attn_v_proj", "SDXL")
    assert t == keymaps.LoraTarget("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj",
                                   "text_encoder_2", 2)
    assert t.weight_key == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    t = keymaps.ldm_module_of_kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "SDXL")
    assert t.module == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    t = keymaps.ldm_module_of_kohya("lora_te_text_model_encoder_layers_3_mlp_fc1", "SD2")
    assert t.module == "cond_stage_model.model.transformer.resblocks.3.mlp.c_fc"


@pytest.mark.parametrize("arch", UNET_ARCHS)
def test_kohya_names_round_trip_and_hit_real_weights(arch):
    layout = load_layout(arch)
    table = keymaps.kohya_lora_names(arch)
    for name, t in table.items():
        assert t.weight_key in layout, name
        assert len(layout[t.weight_key]) >= 2
        back = keymaps.kohya_name_of_module(t.module + ("#" + "qkv"[t.qkv_index] if t.qkv_index is not None else ""),
                                            arch)
        assert table[back] == t
    # every UNet weight matrix is reachable
    unet_mats = {k for k, s in layout.items() if k.startswith(keymaps.UNET_PREFIX) and k.endswith(".weight")
                 and len(s) >= 2}
    assert unet_mats == {t.weight_key for t in table.values() if t.component == "unet"}


def test_ema_key_names_match_sd_mecha(mecha_layout):
    ref = set(mecha_layout("sd1-ldm")["ema"]) - {"model_ema.decay", "model_ema.num_updates"}
    ours = {keymaps.ema_key_of(k) for k in load_layout("SD1") if k.startswith(keymaps.UNET_PREFIX)}
    assert ours == ref
