"""Forge 2.0.1 backend/patcher/base.py (double): ``ModelPatcher`` with its LoRA patch sets."""
import copy

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        p = set()
        model_keys = set(k for k, _ in self.model.named_parameters())
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                function = k[2] if len(k) > 2 else None
            if key in model_keys:
                p.add(k)
                this_patches.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[lora_identifier] = this_patches
        return p

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)
