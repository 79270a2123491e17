"""Forge Neo backend/patcher/base.py (ComfyUI's ModelPatcher, double): patches per key, merged at load.

Shapes kept: ``add_patches(patches, strength_patch=1.0, strength_model=1.0)`` (no filename, no online mode) appends
``(strength_patch, value, strength_model, offset, function)`` to ``patches[key]`` and returns the keys it took;
clones copy the patch lists and share ``backup``; ``patch_model`` merges each patched key from the backed-up weight
(``patch_weight_to_device``) when the model does not already carry this patch set (``patches_uuid``);
``unpatch_model`` restores the backup. ``lora_patches`` is still created (empty) and no longer read.
"""
import collections
import copy
import uuid

import torch

from backend import utils
from backend.patcher.lora import merge_lora_to_weight


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None,
                 weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.lora_patches = {}
        if not hasattr(self.model, "current_weight_patches_uuid"):
            self.model.current_weight_patches_uuid = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                function = k[2] if len(k) > 2 else None
            if key in model_sd:
                p.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        _, _, weight = utils.get_attr_with_parent(self.model, key)
        if key not in self.backup:
            self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(
                weight.to(device=self.offload_device, copy=True), inplace_update)
        temp = weight.to(torch.float32, copy=True)
        out = merge_lora_to_weight(self.patches[key], temp, key).to(weight.dtype)
        utils.set_attr(self.model, key, out)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for k, bk in self.backup.items():
                utils.set_attr(self.model, k, bk.weight)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if self.model.current_weight_patches_uuid is not None and \
                self.model.current_weight_patches_uuid == self.patches_uuid:
            return self.model
        self.unpatch_model()
        with torch.inference_mode():
            for key in self.patches:
                self.patch_weight_to_device(key, device_to)
        self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model
