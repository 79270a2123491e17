"""Forge 2.0.1 backend/patcher/unet.py (double): ``UnetPatcher`` is a ``ModelPatcher`` over a KModel (which holds
``diffusion_model`` and ``storage_dtype``)."""
from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    pass
