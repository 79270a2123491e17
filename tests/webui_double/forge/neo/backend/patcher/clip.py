"""Forge Neo backend/patcher/clip.py (double): the CLIP object holds its patcher."""
from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, model_dict=None, tokenizer_dict=None, no_init=False):
        if no_init:
            return
        import torch
        self.cond_stage_model = torch.nn.ModuleDict(model_dict or {})
        self.tokenizer = tokenizer_dict or {}
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *arg, **kwargs):
        return self.patcher.add_patches(*arg, **kwargs)
