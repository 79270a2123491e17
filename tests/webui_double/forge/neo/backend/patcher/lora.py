"""Forge Neo backend/patcher/lora.py (double): ``merge_lora_to_weight`` as Neo has it.

Shapes kept: a patch value that is a ``weight_adapter.WeightAdapterBase`` is computed by its ``calculate_weight(weight,
key, strength, strength_model, offset, function, computation_dtype)``; a ``(type, payload)`` value of a type other
than ``diff``/``set`` raises (``extra_weight_calculators`` is still defined but no longer read). A patch with an
``offset`` (a slice of a fused Flux weight) is computed on the weight narrowed to it (an adapter gets the narrowed
view and changes it in place); ``function`` (Flux's ``swap_scale_shift``) is applied to ``diff`` and passed to
adapters.
"""
import torch

from modules_forge.packages.comfy.lora import (load_lora, model_lora_keys_clip,  # noqa: F401 - Neo re-exports them
                                               model_lora_keys_unet, weight_adapter)

extra_weight_calculators = {}


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        dtype_backup, weight = weight.dtype, weight.to(dtype=computation_dtype)
    for p in patches:
        strength, v, strength_model, offset, function = p[0], p[1], p[2], p[3], p[4]
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            out = v.calculate_weight(weight, key, strength, strength_model, offset, function, computation_dtype)
            if out is not None:
                weight = out if old_weight is None else old_weight
            continue
        if len(v) == 1:
            patch_type = "diff"
        else:
            patch_type, v = v[0], v[1]
        if patch_type == "diff":
            if strength != 0.0:
                weight += function(strength * v[0].to(weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(v[0])
        else:
            raise ValueError(f'"{key}" of type "{patch_type}" is not recognized...')
        if old_weight is not None:
            weight = old_weight
    if dtype_backup is not None:
        weight = weight.to(dtype=dtype_backup)
    return weight
