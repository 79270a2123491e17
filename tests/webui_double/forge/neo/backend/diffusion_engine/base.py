"""Forge Neo backend/diffusion_engine/base.py (double): what ``shared.sd_model`` is on Forge."""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    """``forge_objects`` is what a generation uses (reset from ``forge_objects_after_applying_lora`` before each
    pass); ``forge_objects_original`` is the model as loaded; the ``is_*`` flags name the family."""

    def __init__(self, forge_objects, is_sd1=False, is_sd2=False, is_sdxl=False):
        self.forge_objects = forge_objects
        self.forge_objects_original = forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = is_sd1, is_sd2, is_sdxl, False
