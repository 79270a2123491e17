"""DoRA on Flux.1 layers (bake), against the DoRA formula written out here in plain torch.

DoRA (Liu et al. 2024; kohya/A1111 ``apply_weight_decompose``; LyCORIS ``wd_on_output``; PEFT's
``lora_magnitude_vector``): W_c = W + (alpha/r)·B@A, W'' = m · W_c / ‖W_c‖ with the norm per input column (kohya /
A1111: ``dora_scale`` of shape [1, in]) or per output row (LyCORIS [out, 1], PEFT [out]); a strength s gives
W' = W + s·(W'' − W) (A1111 multiplies the decomposed ΔW by the multiplier; Forge: ``weight += strength·(W_c − W)``).
On a slice of a fused weight (diffusers ``to_k`` = the k rows of BFL's ``img_attn.qkv``, ``proj_mlp`` = the mlp rows of
``linear1``) the norm is over that slice only, as Forge narrows the weight to the key map's offset before computing
the patch (checked against the real Forge 2.0.1's ``weight_decompose``: see tests/test_forge_flux_lora.py).
"""
from __future__ import annotations

import torch

from lib_sdtoolkit.files import load_state_dict, save_safetensors

from test_lora_flux import H, base  # noqa: F401 - the tiny BFL Flux.1 dev fixture

R = 4


def dora_formula(w, up, down, scale, m, on_out, strength):
    """W + s·(m·W_c/‖W_c‖ − W), W_c = W + scale·up@down; fp32."""
    merged = w + scale * (up @ down)
    n = merged.norm(dim=1, keepdim=True) if on_out else merged.norm(dim=0, keepdim=True)
    return w + strength * (m.reshape(n.shape) * merged / n - w)


def dora_layers(g, peft=True):
    """(file module, BFL key, rows or None, out, in, axis, dora part name, alpha) of the test's DoRA layers."""
    out = [("lora_unet_double_blocks_3_img_attn_qkv", "double_blocks.3.img_attn.qkv.weight", None, 3 * H, H, "in"),
           ("lora_unet_single_blocks_9_linear2", "single_blocks.9.linear2.weight", None, H, 5 * H, "out"),
           ("transformer.transformer_blocks.6.attn.to_k", "double_blocks.6.img_attn.qkv.weight", (H, 2 * H), H, H, "in"),
           ("transformer.transformer_blocks.7.attn.add_v_proj", "double_blocks.7.txt_attn.qkv.weight", (2 * H, 3 * H), H,
            H, "out")]
    if peft:   # PEFT's 1-D magnitude on the mlp rows of linear1 and on a square q slice (Forge reads only ``.dora_scale``)
        out.append(("transformer.single_transformer_blocks.4.proj_mlp", "single_blocks.4.linear1.weight",
                     (3 * H, 7 * H), 4 * H, H, "out1d"))
        out.append(("transformer.transformer_blocks.8.attn.to_q", "double_blocks.8.img_attn.qkv.weight", (0, H), H, H,
                    "out1d"))
    return out


def dora_file(path, peft=True, seed=31):
    """A DoRA file on Flux layers in kohya and diffusers names; returns {BFL key: (rows, up, down, scale, m, on_out)}."""
    g = torch.Generator().manual_seed(seed)
    sd, layers = {}, {}
    for name, key, rows, o, i, axis in dora_layers(g, peft):
        down, up = torch.randn(R, i, generator=g) * 0.3, torch.randn(o, R, generator=g) * 0.3
        m = torch.rand(o if axis != "in" else i, generator=g) + 0.5
        mshape = {"in": (1, i), "out": (o, 1), "out1d": (o,)}[axis]
        kohya = name.startswith("lora_")
        sd[f"{name}.{'lora_down.weight' if kohya else 'lora_A.weight'}"] = down
        sd[f"{name}.{'lora_up.weight' if kohya else 'lora_B.weight'}"] = up
        sd[f"{name}.alpha"] = torch.tensor(2.0)
        sd[f"{name}.{'lora_magnitude_vector' if axis == 'out1d' else 'dora_scale'}"] = m.reshape(mshape)
        layers[key] = (rows, up, down, 2.0 / R, m, axis != "in")
    save_safetensors(path, sd)
    return layers


def test_bake_dora_on_flux_equals_the_formula(base, tmp_path):  # noqa: F811
    """Both axes, a whole fused qkv, the non-square linear2, slices of qkv (to_k, add_v_proj) and of linear1
    (proj_mlp), PEFT's 1-D magnitude on the mlp rows and on the square q slice of a qkv (per output row: it was
    refused as ambiguous): the slice's own rows are decomposed, every other row and key is untouched."""
    from lib_sdtoolkit.lora.bake import bake

    layers = dora_file(tmp_path / "dora.safetensors")
    out = load_state_dict(bake(base["bfl"], [(tmp_path / "dora.safetensors", 0.7)], tmp_path / "o.safetensors")["output"])
    sd = base["sd"]
    for key, (rows, up, down, scale, m, on_out) in layers.items():
        want = sd[key].clone()
        a, b = rows if rows is not None else (0, want.shape[0])
        want[a:b] = dora_formula(sd[key][a:b], up, down, scale, m, on_out, 0.7)
        torch.testing.assert_close(out[key], want, rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(out[key][:a], sd[key][:a]) and torch.equal(out[key][b:], sd[key][b:]), key
        # the decomposition changed the result against a plain LoRA of the same factors
        plain = sd[key][a:b] + 0.7 * scale * (up @ down)
        assert not torch.allclose(out[key][a:b], plain, atol=1e-3), key
    assert all(torch.equal(out[k], sd[k]) for k in sd if k not in layers)


def test_bridge_dora_equals_the_formula(tmp_path):
    """The Forge bridge's patch (``apply_patch`` on the narrowed weight Forge hands it) against the formula, both
    axes and strengths 1 and 0.6 (the hosts' two branches)."""
    from lib_sdtoolkit.lora.network import load_network
    from lib_sdtoolkit.lora.patcher_bridge import LayerPatch, apply_patch

    layers = dora_file(tmp_path / "dora.safetensors")
    net = load_network(tmp_path / "dora.safetensors", "Flux.1")
    g = torch.Generator().manual_seed(3)
    assert len(net.layers) == len(layers)
    for layer in net.layers:
        key = layer.target.module + ".weight"
        rows, up, down, scale, m, on_out = layers[key]
        n_rows = up.shape[0]
        w = torch.randn(n_rows, down.shape[1], generator=g) * 0.2
        for s in (1.0, 0.6):
            got = apply_patch(w.clone(), s, LayerPatch(layer.weights, 1.0))
            torch.testing.assert_close(got, dora_formula(w, up, down, scale, m, on_out, s), rtol=1e-5, atol=1e-6,
                                       msg=f"{key} strength {s}")


def test_double_block_only_diffusers_file_is_flux(tmp_path):
    """A diffusers/PEFT Flux LoRA that trains only double blocks (``transformer.transformer_blocks.N.attn.to_k``) is
    Flux.1 (it was guessed SD1 and refused on a Flux model); an SD UNet's nested ``transformer_blocks`` stay SD."""
    from lib_sdtoolkit.lora.network import guess_lora_arch

    assert guess_lora_arch(["transformer.transformer_blocks.6.attn.to_k.lora_A.weight"], {}) == "Flux.1"
    assert guess_lora_arch(["base_model.model.transformer_blocks.0.attn.add_q_proj.lora_A.weight"], {}) == "Flux.1"
    assert guess_lora_arch(["lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight"], {}) == "Flux.1"
    assert guess_lora_arch(["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],
                           {}) == "SD1"
    assert guess_lora_arch(["transformer.transformer_blocks.6.attn.to_k.lora_A.weight"],
                           {"modelspec.architecture": "stable-diffusion-3-medium/lora"}) != "Flux.1"
