"""ComfyUI comfy/weight_adapter/base.py as Forge Neo vendors it: the signature a patch value must answer, and
``weight_decompose`` (DoRA; Neo's backend/patcher/lora.py at 419825e7 / 9bb88948 carries the same function): ΔW·alpha
added to W, the sum scaled by ``dora_scale / (norm + eps)``, then ``W += strength·(W_c − W)`` (``W = W_c`` at strength
1). The norm is per input column of W + ΔW when ``dora_scale.shape[0]`` differs from the rows, and per output row *of
the original W* when it equals them (the host's quirk, kept because it is the host's behaviour).
"""
import torch


@torch.inference_mode()
def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function):
    scale = dora_scale.to(weight.device, intermediate_dtype)
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
