"""Forge Neo modules_forge/packages/comfy/weight_adapter (ComfyUI's): the adapter base class and the list of adapter
classes ``load_lora`` tries (the double keeps only the plain LoRA one)."""
from .base import WeightAdapterBase
from .lora import LoRAAdapter

adapters = [LoRAAdapter]

__all__ = ["LoRAAdapter", "WeightAdapterBase", "adapters"]
