"""Forge Neo modules_forge/packages/comfy/lora.py (ComfyUI v0.3.77's, double): the key maps and ``load_lora``.

Shape kept: ``model_lora_keys_clip`` returns ``(state-dict keys, key map)``; ``model_lora_keys_unet`` returns the key
map. Only the SD1 CLIP-L and ldm UNet names are kept. ``load_lora`` reads ``x.alpha`` and asks each class of
``weight_adapter.adapters`` in turn; the patch of a module is the adapter that took it.
"""
from modules_forge.packages.comfy import weight_adapter  # noqa: F401 - Neo's backend.patcher.lora re-exports it

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
        for cls in weight_adapter.adapters:
            adapter = cls.load(name, lora, alpha, None, used)
            if adapter is not None:
                patches[param] = adapter
                used.update(adapter.loaded_keys)
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
    return sdk, key_map


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - ComfyUI's own signature
    for k in model.state_dict():
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map
