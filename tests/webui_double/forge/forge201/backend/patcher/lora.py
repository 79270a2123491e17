"""Forge 2.0.1 backend/patcher/lora.py (double): key maps, ``merge_lora_to_weight`` and ``LoraLoader``.

Shapes kept: ``extra_weight_calculators`` (patch type -> ``f(weight, strength, payload)``), the key maps return a
dict (kohya name -> parameter), a patch entry is ``[strength_patch, value, strength_model, offset, function]``,
``LoraLoader.refresh`` re-merges only when the identifiers of the patch sets change, restoring its own backup first.
Of the built-in patch types ``diff`` and ``lora`` are kept, and ``load_lora`` for a plain kohya LoRA (``lora_up`` /
``lora_down`` / ``alpha``; comfyui_lora_collection's is the one Forge picks for that), so a test can run Forge's own
``<lora:...>`` beside ours. Forge's order of operations for ``lora`` matters and is kept: ``ΔW = up @ down`` in fp32,
then ``(strength * alpha/rank) * ΔW`` cast to the weight's dtype, then added (a fused ``addmm`` rounds differently).
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
        if up not in lora or down not in lora:
            continue
        alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else None
        used.update(k for k in (up, down, f"{name}.alpha") if k in lora)
        patches[param] = ("lora", (lora[up], lora[down], alpha, None, None))
    return patches, {k: v for k, v in lora.items() if k not in used}


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - Forge's own signature
    sdk = model.state_dict().keys()
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
    return key_map


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if weight.dtype == computation_dtype:
        weight = weight.clone()
    else:
        dtype_backup, weight = weight.dtype, weight.to(dtype=computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        if len(v) == 1:
            patch_type = "diff"
        else:
            patch_type, v = v[0], v[1]
        if patch_type == "diff":
            if strength != 0.0:
                weight += strength * v[0].to(weight.device, weight.dtype)
        elif patch_type == "lora":
            up, down = v[0].to(weight.device, computation_dtype), v[1].to(weight.device, computation_dtype)
            alpha = v[2] / down.shape[0] if v[2] is not None else 1.0
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            weight += ((strength * alpha) * diff).type(weight.dtype)
        elif patch_type in extra_weight_calculators:
            weight = extra_weight_calculators[patch_type](weight, strength, v)
        else:
            print(f"patch type not recognized {patch_type} {key}")
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
