"""The WebUI's loaded SD1 ``sd_model`` built from the real tiny modules (ldm UNetModel, ldm-layout AutoencoderKL,
transformers CLIPTextModel from :mod:`lib_sdtoolkit.samples.factory`), for the tests that drive the WebUI double
with a loaded model (test_merge_webui.py, test_merge_grid_webui.py). Only the module tree and the calls a
generation makes are rebuilt here; the weights are loaded the WebUI's way (``sd_models.load_model_weights``) and the
model hijacked as the WebUI hijacks it. Import it after the WebUI double is on ``sys.path``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

#: tokens per prompt of the tokenizer stand-in
SEQ = 8


class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm.modules.encoders.modules.FrozenCLIPEmbedder's module tree (``.transformer`` = CLIPTextModel); the real
    class downloads its tokenizer in __init__, so the tree is rebuilt around the real transformers module, with a
    deterministic stand-in for the tokenizer (the real one downloads a vocabulary): BOS, characters, EOS padding."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, texts: List[str]) -> torch.Tensor:
        vocab = self.transformer.config.vocab_size
        rows = []
        for t in texts:
            ids = [vocab - 2] + [ord(c) % (vocab - 2) for c in t][:SEQ - 2]
            rows.append(ids + [vocab - 1] * (SEQ - len(ids)))
        return self.transformer(input_ids=torch.tensor(rows)).last_hidden_state


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(torch.nn.Module):
    """The WebUI's SD1 ``sd_model`` layout (``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``)
    and the two calls a generation makes on it."""

    def __init__(self, mods: Dict[str, torch.nn.Module]):
        super().__init__()
        self.model = DiffusionWrapper(mods["unet"])
        self.first_stage_model = mods["vae"]
        self.cond_stage_model = FrozenCLIPEmbedder(mods["text_encoder"])
        self.scale_factor = 0.18215

    def get_learned_conditioning(self, prompts):
        # the first call of a generation: one intra-op thread in whichever thread runs it (the API's worker thread
        # or the test's), so a reduction's result never depends on the thread count
        torch.set_num_threads(1)
        return self.cond_stage_model(prompts)

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


def load_sd1(checkpoint: Union[str, Path], half: bool) -> Tuple[LatentDiffusion, object]:
    """(the loaded, hijacked model, its ``CheckpointInfo``): the WebUI's load_model for an SD1 checkpoint: build,
    ``load_model_weights`` (load_state_dict strict=False), ``half()`` when the WebUI would (not --no-half), eval,
    hijack."""
    from modules import sd_hijack, sd_models

    from lib_sdtoolkit.samples import factory

    model = LatentDiffusion(factory.build_modules("SD1"))
    info = sd_models.CheckpointInfo(str(checkpoint))
    sd_models.load_model_weights(model, info, sd_models.read_state_dict(str(checkpoint)))
    if half:
        model.half()
    model.eval()
    sd_hijack.model_hijack.hijack(model)
    return model, info


def plain_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The loaded model's tensors under checkpoint names (undo the hijack for the read, as the WebUI would)."""
    from modules import sd_hijack

    sd_hijack.model_hijack.undo_hijack(model)
    try:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        sd_hijack.model_hijack.hijack(model)
