"""Forge Neo backend/modules/k_model.py (double): ``KModel`` is what a UnetPatcher patches: the diffusion model at
``.diffusion_model`` (parameters ``diffusion_model.*``), the model's guess at ``.config`` (its ``huggingface_repo`` names
the family for the LoRA key map), ``storage_dtype`` / ``computation_dtype`` copied from the model. No sampling."""
import torch


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_predictor
