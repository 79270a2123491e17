"""ComfyUI comfy/weight_adapter/base.py as Forge Neo vendors it: the signature a patch value must answer."""
import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: list

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError
