"""Forge 2.0.1 backend/patcher/lora.py (double): key maps, ``merge_lora_to_weight`` and ``LoraLoader``.

Shapes kept: ``extra_weight_calculators`` (patch type -> ``f(weight, strength, payload)``), the key maps return a
dict (kohya name -> parameter), a patch entry is ``[strength_patch, value, strength_model, offset, function]``,
``LoraLoader.refresh`` re-merges only when the identifiers of the patch sets change, restoring its own backup first.
Of the built-in patch types ``diff`` and ``lora`` are kept, and ``load_lora`` for a plain kohya LoRA (``lora_up`` /
``lora_down`` / ``alpha``; comfyui_lora_collection's is the one Forge picks for that), so a test can run Forge's own
``<lora:...>`` beside ours. Forge's order of operations for ``lora`` matters and is kept: ``ΔW = up @ down`` in fp32,
then ``(strength * alpha/rank) * ΔW`` cast to the weight's dtype, then added (a fused ``addmm`` rounds differently).

Flux.1 (``model.config.huggingface_repo`` names FLUX): ``model_lora_keys_unet`` adds comfyui_lora_collection's
diffusers names (``transformer.<diffusers module>``, ``lycoris_`` / ``lora_transformer_`` + underscores) from
``flux_to_diffusers(model.diffusion_model.config, output_prefix="diffusion_model.")``, whose value for a slice of a
fused weight is ``(key, (0, first row, rows))`` and for ``norm_out.linear`` ``(key, None, swap_scale_shift)``;
``model_lora_keys_clip`` maps T5-XXL's ``t5xxl.transformer.*`` weights as ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``
(Forge's own addition). ``merge_lora_to_weight`` narrows the weight to a patch's ``offset`` before computing it (an
extra weight calculator gets the narrowed view and must change it in place) and passes ``lora``/``diff`` deltas
through the key's ``function``. ``load_lora`` also takes PEFT's ``lora_A``/``lora_B`` names.

DoRA (``x.dora_scale``, read by ``load_lora`` into the ``lora`` payload): ``weight_decompose`` as Forge 2.0.1 has it
(ComfyUI's): ``ΔW·alpha`` added to W, the sum scaled by ``dora_scale / (norm + eps)``, then ``W += strength·(W_c − W)``
(``W = W_c`` at strength 1). The norm: per input column of W + ΔW when ``dora_scale.shape[0]`` differs from the rows;
per output row *of the original W* when it equals them (the host's quirk, kept because it is the host's behaviour).
"""
import torch

from backend import utils

extra_weight_calculators = {}

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def load_lora(lora, to_load):
    """(patch dict {parameter: ("lora", (up, down, alpha, mid, dora_scale))}, the file's keys not used)."""
    patches, used = {}, set()
    for name, param in to_load.items():
        up, down = f"{name}.lora_up.weight", f"{name}.lora_down.weight"
        if up not in lora:
            up, down = f"{name}.lora_B.weight", f"{name}.lora_A.weight"
        if up not in lora or down not in lora:
            continue
        alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else None
        dora = lora.get(f"{name}.dora_scale")
        used.update(k for k in (up, down, f"{name}.alpha", f"{name}.dora_scale") if k in lora)
        patches[param] = ("lora", (lora[up], lora[down], alpha, None, dora))
    return patches, {k: v for k, v in lora.items() if k not in used}


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


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - Forge's own signature
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.startswith("t5xxl.transformer.") and k.endswith(".weight"):
            name = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            for prefix in ("te1", "te2", "te3"):
                key_map[f"lora_{prefix}_{name}"] = k
    for b in range(32):
        for c, lc in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lc}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lc}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - Forge's own signature
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
    config = getattr(model, "config", None)
    if "flux" in str(getattr(config, "huggingface_repo", "")).lower():
        for k, to in flux_to_diffusers(model.diffusion_model.config, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                name = k[:-len(".weight")]
                key_map[f"transformer.{name}"] = to
                key_map[f"lycoris_{name.replace('.', '_')}"] = to
                key_map[f"lora_transformer_{name.replace('.', '_')}"] = to
    return key_map


@torch.inference_mode()
def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
    """DoRA as Forge 2.0.1 merges it (see the module doc); ``weight`` is changed in place and returned."""
    scale = dora_scale.to(weight.device, computation_dtype)
    lora_diff *= alpha
    calc = weight + function(lora_diff).type(weight.dtype)
    ones = [1] * (weight.dim() - 1)
    if scale.shape[0] == calc.shape[0]:       # per output row: the norm of the original weight (the host's quirk)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
    else:                                     # per input column of W + ΔW
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *ones).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    calc *= (scale / norm).type(weight.dtype)
    if strength != 1.0:
        calc -= weight
        weight += strength * calc
    else:
        weight[:] = calc
    return weight


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if weight.dtype == computation_dtype:
        weight = weight.clone()
    else:
        dtype_backup, weight = weight.dtype, weight.to(dtype=computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if len(v) == 1:
            patch_type = "diff"
        else:
            patch_type, v = v[0], v[1]
        if patch_type == "diff":
            if strength != 0.0:
                weight += function(strength * v[0].to(weight.device, weight.dtype))
        elif patch_type == "lora":
            up, down = v[0].to(weight.device, computation_dtype), v[1].to(weight.device, computation_dtype)
            alpha = v[2] / down.shape[0] if v[2] is not None else 1.0
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            if v[4] is not None:
                weight = weight_decompose(v[4], weight, diff, alpha, strength, computation_dtype, function)
            else:
                weight += function(((strength * alpha) * diff).type(weight.dtype))
        elif patch_type in extra_weight_calculators:
            weight = extra_weight_calculators[patch_type](weight, strength, v)
        else:
            print(f"patch type not recognized {patch_type} {key}")
        if old_weight is not None:
            weight = old_weight
    if dtype_backup is not None:
        weight = weight.to(dtype=dtype_backup)
    return weight


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for k, w in self.backup.items():
            utils.set_attr_raw(self.model, k, w if isinstance(w, torch.nn.Parameter)
                               else torch.nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for (key, online_mode), current in all_patches.items():
            _, _, weight = utils.get_attr_with_parent(self.model, key)
            if not isinstance(weight, torch.nn.Parameter):
                raise ValueError(f"Wrong LoRA Key: {key}")
            if online_mode:
                raise NotImplementedError("the double has no online (quantized) LoRA mode")
            self.backup.setdefault(key, weight.to(device=offload_device))
            utils.set_attr(self.model, key, merge_lora_to_weight(current, weight, key))
        self.loaded_hash = hashes
