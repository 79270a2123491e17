"""Full-width key -> shape layouts of real checkpoints, shipped as data.

``<arch>.json.gz`` files hold ``{"architecture": ..., "keys": {name: [shape...]}, "dtypes": {name: dtype}}`` in the
key order of the real modules' state dicts (``dtypes`` lists only the keys that are not floating point, e.g. CLIP
``position_ids`` int64). They are generated from the real ldm / diffusers / transformers modules on the ``meta``
device by ``python -m lib_sdtoolkit.samples.gen_layouts`` (a test regenerates and compares). Arch detection uses them
to tell known keys from junk by name.
"""
from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from typing import Dict, Tuple

#: architectures with a shipped layout, and their file stems
LAYOUT_FILES = {
    "SD1": "sd1",
    "SD1-inpainting": "sd1-inpainting",
    "SD1-instruct-pix2pix": "sd1-instruct-pix2pix",
    "SD2": "sd2",
    "SDXL": "sdxl",
    "SDXL-refiner": "sdxl-refiner",
    "VAE": "vae",
}


@functools.lru_cache(maxsize=None)
def _load(arch: str) -> Tuple[Tuple[Tuple[str, Tuple[int, ...]], ...], Tuple[Tuple[str, str], ...]]:
    try:
        stem = LAYOUT_FILES[arch]
    except KeyError:
        raise ValueError(f"no layout for architecture {arch!r}; known: {', '.join(LAYOUT_FILES)}") from None
    raw = resources.files(__name__).joinpath(f"{stem}.json.gz").read_bytes()
    data = json.loads(gzip.decompress(raw).decode("utf-8"))
    return (tuple((k, tuple(v)) for k, v in data["keys"].items()), tuple(data.get("dtypes", {}).items()))


def load_layout(arch: str) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a full-size checkpoint of ``arch`` (see :data:`LAYOUT_FILES`), in module order.

    Checkpoint layouts (SD1, SD2, SDXL, SDXL-refiner) hold the UNet (``model.diffusion_model.``), VAE
    (``first_stage_model.``) and text encoder keys, including ``position_ids`` for HF CLIP; no EMA, no DDPM buffers.
    The ``VAE`` layout holds bare VAE keys (``encoder.``, ``decoder.``, ``quant_conv.``, ``post_quant_conv.``).
    Returns a fresh dict each call."""
    return dict(_load(arch)[0])


def load_layout_dtypes(arch: str) -> Dict[str, str]:
    """Keys of the layout whose dtype is not floating point -> dtype name (``"int64"``)."""
    return dict(_load(arch)[1])
