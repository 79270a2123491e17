"""Forge Neo modules_forge/packages/comfy/lora.py (ComfyUI v0.3.77's, double): the key maps and ``load_lora``.

Shape kept: ``model_lora_keys_clip`` returns ``(state-dict keys, key map)``; ``model_lora_keys_unet`` returns the key
map. Kept names: SD1's CLIP-L and ldm UNet; Flux.1 (``model.config.huggingface_repo`` names flux or chroma): the
diffusers names from ``utils.flux_to_diffusers`` (``transformer.``, ``lycoris_``, ``lora_transformer_``; values with
offsets / the swap function) and ``diffusion_model.single_blocks.N.linear1_qkv`` -> the q|k|v rows of ``linear1``;
T5-XXL's ``t5xxl.transformer.*`` as ``lora_te2_`` / ``lora_te3_`` beside CLIP-L (Neo's index rule). ``load_lora`` reads ``x.alpha`` and
``x.dora_scale`` and asks each class of ``weight_adapter.adapters`` in turn (the patch of a module is the adapter that
took it); then, as Neo's, ``x.diff`` -> ``("diff", (t,))``, ``x.diff_b`` -> a ``diff`` on the module's bias and
``x.set_weight`` -> ``("set", (t,))``. Not kept: the BFL control-LoRA conversion and ``w_norm``/``b_norm``.
"""
from modules_forge.packages.comfy import weight_adapter  # noqa: F401 - Neo's backend.patcher.lora re-exports it
from modules_forge.packages.comfy.utils import flux_to_diffusers

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def load_lora(lora, to_load):
    """(patch dict {parameter: adapter}, the file's keys not used)."""
    patches, used = {}, set()
    for name, param in to_load.items():
        alpha = None
        if f"{name}.alpha" in lora:
            alpha = lora[f"{name}.alpha"].item()
            used.add(f"{name}.alpha")
        dora = lora.get(f"{name}.dora_scale")
        if dora is not None:
            used.add(f"{name}.dora_scale")
        for cls in weight_adapter.adapters:
            adapter = cls.load(name, lora, alpha, dora, used)
            if adapter is not None:
                patches[param] = adapter
                used.update(adapter.loaded_keys)
        target = param[0] if isinstance(param, tuple) else param
        for part, kind in (("diff", "diff"), ("set_weight", "set")):
            if f"{name}.{part}" in lora:
                patches[param] = (kind, (lora[f"{name}.{part}"],))
                used.add(f"{name}.{part}")
        if f"{name}.diff_b" in lora:
            patches[target[:-len(".weight")] + ".bias"] = ("diff", (lora[f"{name}.diff_b"],))
            used.add(f"{name}.diff_b")
    return patches, {k: v for k, v in lora.items() if k not in used}


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - ComfyUI's own signature
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders." + k[:-len(".weight")]] = k
    for b in range(32):
        for c, lc in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lc}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lc}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    clip_l = any(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in sdk)
    for k in sdk:
        if k.startswith("t5xxl.transformer.") and k.endswith(".weight"):
            name = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            index = 2 if clip_l else 1
            if clip_l:
                key_map[f"lora_te{index}_{name}"] = k
                index += 1
            key_map[f"lora_te{index}_{name}"] = k
    return sdk, key_map


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - ComfyUI's own signature
    for k in model.state_dict():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    repo = str(getattr(getattr(model, "config", None), "huggingface_repo", "")).lower()
    if "flux" in repo or "chroma" in repo:
        for k, to in flux_to_diffusers(model.diffusion_model.config, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                name = k[:-len(".weight")]
                key_map[f"transformer.{name}"] = to
                key_map[f"lycoris_{name.replace('.', '_')}"] = to
                key_map[f"lora_transformer_{name.replace('.', '_')}"] = to
        h = model.diffusion_model.config.get("hidden_size", 0)
        for k in model.state_dict():
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, h * 3))
    return key_map
