"""Forge Neo modules_forge/packages/comfy/weight_adapter (ComfyUI's): the adapter base class and the list of adapter
classes ``load_lora`` tries (the double has none of ComfyUI's own adapters)."""
from .base import WeightAdapterBase

adapters = []

__all__ = ["WeightAdapterBase", "adapters"]
