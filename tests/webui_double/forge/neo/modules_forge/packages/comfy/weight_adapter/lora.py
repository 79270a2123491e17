"""ComfyUI comfy/weight_adapter/lora.py as Forge Neo vendors it (double): the plain LoRA adapter.

Kept: ``load(x, lora, alpha, dora_scale, loaded_keys)`` picks ``x.lora_up.weight`` / ``x.lora_down.weight`` (or
``x.lora_B.weight`` / ``x.lora_A.weight``; None when
the module is not a plain LoRA; ``weights`` laid out as ComfyUI's: up, down, alpha, mid, dora_scale, reshape), and
``calculate_weight`` in ComfyUI's order: ``ΔW = up @ down`` in the intermediate dtype, then ``(strength * alpha/rank)
* ΔW`` cast to the weight's dtype, passed through ``function``, added - or, with a ``dora_scale``, ``weight_decompose``
(base.py). No CP mid, no reshape of the double's models (Forge Neo's other LoRA names are not kept).
"""
import torch

from .base import WeightAdapterBase, weight_decompose


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora:                    # diffusers / PEFT names
            up, down = f"{x}.lora_B.weight", f"{x}.lora_A.weight"
        if up not in lora or down not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha, None, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha = self.weights[0], self.weights[1], self.weights[2]
        up = up.to(weight.device, intermediate_dtype)
        down = down.to(weight.device, intermediate_dtype)
        alpha = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
        if self.weights[4] is not None:
            return weight_decompose(self.weights[4], weight, diff, alpha, strength, intermediate_dtype, function)
        weight += function(((strength * alpha) * diff).type(weight.dtype))
        return weight
