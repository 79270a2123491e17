"""Forge Neo modules_forge/packages/comfy/utils.py (ComfyUI's, double): ``flux_to_diffusers`` - diffusers Flux
parameter -> BFL parameter, ``(BFL parameter, (0, first row, rows))`` for a slice of a fused weight,
``(BFL parameter, None, swap_scale_shift)`` for ``norm_out.linear``."""
import torch


def swap_scale_shift(weight):
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_diffusers(config, output_prefix=""):
    """diffusers Flux parameter -> BFL parameter, or (BFL parameter, offset, function) for a slice / a swap."""
    h = config.get("hidden_size", 0)
    key_map = {}
    double = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "norm1.linear": "img_mod.lin",
              "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    single = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for end in ("weight", "bias"):
        for i in range(config.get("depth", 0)):
            src, dst = f"transformer_blocks.{i}.", f"{output_prefix}double_blocks.{i}."
            for side in ("img", "txt"):
                for j, c in enumerate("qkv"):
                    name = f"{src}attn.to_{c}.{end}" if side == "img" else f"{src}attn.add_{c}_proj.{end}"
                    key_map[name] = (f"{dst}{side}_attn.qkv.{end}", (0, j * h, h))
            for a, b in double.items():
                key_map[f"{src}{a}.{end}"] = f"{dst}{b}.{end}"
        for i in range(config.get("depth_single_blocks", 0)):
            src, dst = f"single_transformer_blocks.{i}.", f"{output_prefix}single_blocks.{i}."
            for j, c in enumerate("qkv"):
                key_map[f"{src}attn.to_{c}.{end}"] = (f"{dst}linear1.{end}", (0, j * h, h))
            key_map[f"{src}proj_mlp.{end}"] = (f"{dst}linear1.{end}", (0, 3 * h, 4 * h))
            for a, b in single.items():
                key_map[f"{src}{a}.{end}"] = f"{dst}{b}.{end}"
        for a, b in top.items():
            key_map[f"{a}.{end}"] = f"{output_prefix}{b}.{end}"
        key_map[f"norm_out.linear.{end}"] = (f"{output_prefix}final_layer.adaLN_modulation.1.{end}", None,
                                             swap_scale_shift)
    return key_map
