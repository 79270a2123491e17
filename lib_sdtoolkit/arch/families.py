"""The checkpoint architectures the toolkit knows, as one table: base names and where each component's keys live.

Every other prefix table is derived from :data:`FAMILIES` (``arch.detect``'s component prefixes,
``keymaps.TEXT_PREFIXES``, the kohya LoRA text-encoder prefixes the LoRA loader and the key maps use), so a new
architecture is one more row here (plus its block conventions in :mod:`lib_sdtoolkit.arch.blocks`), not an edit in
several modules.

Names: the base architectures are ``SD1``, ``SD2``, ``SDXL`` and ``SDXL-refiner``; a variant or a derived model keeps
its base as the part before ``-`` (``SD1-inpainting``, ``SDXL-refiner-...``); :func:`base_arch` maps one to the other.
The refiner is its own architecture everywhere (its UNet has 12 input and 12 output blocks and one OpenCLIP-G text
encoder at ``conditioner.embedders.0``), never "SDXL".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a checkpoint.

    ``root``: the component's key prefix in the checkpoint (what ``detect`` reports); ``prefix``: where the encoder's
    own module tree starts (``root`` + ``transformer.`` for transformers CLIP, + ``model.`` for OpenCLIP);
    ``layout``: ``"hf"`` (transformers CLIP names) or ``"openclip"``; ``kohya``: the prefix kohya LoRA files give its
    module names (they always spell HF CLIP paths, even where the checkpoint holds OpenCLIP)."""

    component: str
    root: str
    prefix: str
    layout: str
    kohya: str


@dataclass(frozen=True)
class Family:
    name: str
    text_encoders: Tuple[TextEncoder, ...]
    unet_prefix: str = UNET_PREFIX
    vae_prefix: str = VAE_PREFIX

    def component_prefixes(self) -> Dict[str, str]:
        """component -> key prefix (unet, vae, text_encoder[_2])."""
        out = {"unet": self.unet_prefix, "vae": self.vae_prefix}
        out.update({te.component: te.root for te in self.text_encoders})
        return out

    def text_encoder(self, component: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.component == component:
                return te
        raise KeyError(f"a {self.name} model has no {component}")


_SD_TE = TextEncoder("text_encoder", "cond_stage_model.", "cond_stage_model.transformer.", "hf", "lora_te_")

#: base architecture -> its facts
FAMILIES: Dict[str, Family] = {
    "SD1": Family("SD1", (_SD_TE,)),
    "SD2": Family("SD2", (TextEncoder("text_encoder", "cond_stage_model.", "cond_stage_model.model.", "openclip",
                                      "lora_te_"),)),
    "SDXL": Family("SDXL", (
        TextEncoder("text_encoder", "conditioner.embedders.0.", "conditioner.embedders.0.transformer.", "hf",
                    "lora_te1_"),
        TextEncoder("text_encoder_2", "conditioner.embedders.1.", "conditioner.embedders.1.model.", "openclip",
                    "lora_te2_"))),
    "SDXL-refiner": Family("SDXL-refiner", (
        TextEncoder("text_encoder_2", "conditioner.embedders.0.", "conditioner.embedders.0.model.", "openclip",
                    "lora_te2_"),)),
}

#: longest name first, so that "SDXL-refiner-x" is a refiner and not an SDXL variant
_BY_LENGTH: Tuple[str, ...] = tuple(sorted(FAMILIES, key=len, reverse=True))


def base_arch(arch: str) -> str:
    """The base architecture of ``arch`` (``SD1-inpainting`` -> ``SD1``; ``SDXL-refiner`` stays the refiner).
    Raises ``ValueError`` for a name that is none of :data:`FAMILIES` (``VAE``, ``LoRA``, ``unknown``...)."""
    for a in _BY_LENGTH:
        if arch == a or arch.startswith(a + "-"):
            return a
    raise ValueError(f"architecture {arch!r} is none of {', '.join(FAMILIES)}")


def family(arch: str) -> Family:
    return FAMILIES[base_arch(arch)]


def text_prefixes(arch: str) -> List[Tuple[str, str, str]]:
    """[(component, module prefix, layout)] of the text encoders of ``arch`` (empty for an unknown name)."""
    try:
        fam = family(arch)
    except ValueError:
        return []
    return [(te.component, te.prefix, te.layout) for te in fam.text_encoders]


__all__ = ["FAMILIES", "Family", "TextEncoder", "base_arch", "family", "text_prefixes", "UNET_PREFIX", "VAE_PREFIX",
           "EMA_PREFIX"]
