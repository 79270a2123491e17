"""Double of extensions-builtin/Lora/lora_patches.py: replaces ``forward`` and ``_load_from_state_dict`` of
``torch.nn.Linear``, ``Conv2d``, ``GroupNorm``, ``LayerNorm`` and ``MultiheadAttention`` with the networks.py
versions (the WebUI does it through ``modules.patches.patch``); ``undo()`` puts the originals back."""
import torch

import networks

_TARGETS = (("Linear", torch.nn.Linear), ("Conv2d", torch.nn.Conv2d), ("GroupNorm", torch.nn.GroupNorm),
            ("LayerNorm", torch.nn.LayerNorm), ("MultiheadAttention", torch.nn.MultiheadAttention))


class LoraPatches:
    def __init__(self):
        for name, cls in _TARGETS:
            setattr(self, f"{name}_forward", cls.forward)
            setattr(self, f"{name}_load_state_dict", cls._load_from_state_dict)
            cls.forward = getattr(networks, f"network_{name}_forward")
            cls._load_from_state_dict = getattr(networks, f"network_{name}_load_state_dict")

    def undo(self):
        for name, cls in _TARGETS:
            cls.forward = getattr(self, f"{name}_forward")
            cls._load_from_state_dict = getattr(self, f"{name}_load_state_dict")
