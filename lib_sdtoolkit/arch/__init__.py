"""What a state dict is: architecture, components, merge blocks, CLIP position_ids.

Detection looks at key names and *structure* (which blocks exist, whether ``proj_in`` is a conv or a linear,
how many input channels the first conv has), not at absolute widths, so it works the same on full-size
checkpoints and on the small-width fixtures the tests build with the real modules.

Which block a key belongs to (the merge MBW rule, the LoRA block-weight rule) is :mod:`lib_sdtoolkit.arch.blocks`;
``block_names`` / ``block_of_key`` here are its MBW convention. Where each component's keys live is
:mod:`lib_sdtoolkit.arch.families`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .blocks import block_names, block_of_key  # the MBW convention: the merge engine's rule
from .families import EMA_PREFIX, FAMILIES, UNET_PREFIX, VAE_PREFIX, base_arch

ARCHITECTURES = ("SD1", "SD2", "SDXL", "SDXL-refiner", "Flux.1", "SD3", "VAE", "CLIP-L", "CLIP-G", "CLIP", "T5",
                 "LoRA", "ControlNet", "unknown")
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "marker", "ema",
              "junk")
#: layouts of the transformer families (``ArchInfo.layout``): BFL/SAI names alone, the all-in-one checkpoint
#: (transformer + VAE and/or text encoders), diffusers names, or one separate component file (VAE, CLIP, T5)
LAYOUTS = ("bfl", "all-in-one", "diffusers", "component")


#: CLIP position_ids keys per layout (int64 [1, 77] holding 0..76)
POSITION_ID_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",  # old (NAI) layout
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
)

_LORA_RE = re.compile(
    r"(lora_up|lora_down|lora_mid|lora_A|lora_B|lora\.up|lora\.down|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|"
    r"lokr_t2|\.diff(_b)?$|\.on_input$|oft_blocks|oft_diag|\.w_norm$|\.b_norm$|dora_scale|lora_linear_layer)")
_CONTROLNET_RE = re.compile(r"(^control_model\.|(^|\.)input_hint_block\.|(^|\.)zero_convs\.|controlnet_cond_embedding\.|"
                            r"controlnet_down_blocks\.|^adapter\.|body\.\d+\.resnets|lora_controlnet)")
_VAE_BARE_RE = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")


def _shape(v: Any) -> Tuple[int, ...]:
    if hasattr(v, "shape"):
        return tuple(v.shape)
    return tuple(v)


@dataclass
class ArchInfo:
    """The result of :func:`detect`."""

    architecture: str
    variant: Optional[str] = None  # "inpainting", "instruct-pix2pix", "depth"
    #: component name -> key prefix, for the components this architecture has
    prefixes: Dict[str, str] = field(default_factory=dict)
    #: free-form facts found on the way (e.g. "UNet only")
    notes: List[str] = field(default_factory=list)
    #: Flux/SD3 and separate component files: one of :data:`LAYOUTS`; None for SD1/SD2/SDXL checkpoints
    layout: Optional[str] = None
    #: component -> the top-level names its keys start with, for components stored without a prefix
    roots: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    #: "v" / "eps" / "v (EDM)" / "EDM" (see :mod:`.markers`), where it is known, and what said so
    prediction: Optional[str] = None
    prediction_source: Optional[str] = None
    #: zero terminal SNR (the ``ztsnr`` marker key)
    ztsnr: bool = False
    #: marker keys present (``v_pred``, ``ztsnr``, ...): kept by every tool as stored
    markers: List[str] = field(default_factory=list)
    #: the base family a metadata field names (Illustrious, NoobAI, Pony, ...) and that field; never guessed
    named_family: Optional[str] = None
    named_family_source: Optional[str] = None

    @property
    def is_checkpoint(self) -> bool:
        return self.architecture in ("SD1", "SD2", "SDXL", "SDXL-refiner")

    @property
    def family(self) -> str:
        """``SD1``/``SD2``/``SDXL`` for checkpoints (the refiner counts as SDXL), else the architecture."""
        return "SDXL" if self.architecture == "SDXL-refiner" else self.architecture

    def to_dict(self) -> Dict[str, Any]:
        return {"architecture": self.architecture, "variant": self.variant, "layout": self.layout,
                "prefixes": dict(self.prefixes), "notes": list(self.notes), "prediction": self.prediction,
                "prediction_source": self.prediction_source, "ztsnr": self.ztsnr, "markers": list(self.markers),
                "family": self.named_family, "family_source": self.named_family_source}


#: component -> key prefix per checkpoint architecture (from the one table in :mod:`.families`)
_PREFIXES = {a: f.component_prefixes() for a, f in FAMILIES.items()}


def _max_index(keys: Iterable[str], block: str) -> int:
    pat = re.compile(re.escape(block) + r"\.(\d+)\.")
    best = -1
    for k in keys:
        m = pat.search(k)
        if m:
            best = max(best, int(m.group(1)))
    return best


#: keys every SD1/SD2/SDXL UNet has (relative to ``model.diffusion_model.``): a file under that prefix without
#: them is some other network (Flux, SD3, ...), never an SD UNet
_UNET_REQUIRED = ("input_blocks.0.0.weight", "middle_block.", "output_blocks.0.", "out.")


def _unet_family(shapes: Mapping[str, Any], unet_keys: List[str]) -> Optional[str]:
    """Tell the UNet's family from its structure; None when the keys under the UNet prefix are not an SD UNet.

    SD1 is named only when the UNet's distinctive keys are all there (``input_blocks.0.0``, ``middle_block``,
    ``output_blocks``, ``out``), not by the absence of SDXL/SD2 markers: a Flux or SD3 transformer stored under
    ``model.diffusion_model.`` once fell through to "SD1"."""
    if not unet_keys:
        return None
    n = len(UNET_PREFIX)
    for req in _UNET_REQUIRED:
        if req.endswith("."):
            if not any(k.startswith(req, n) for k in unet_keys):
                return None
        elif UNET_PREFIX + req not in shapes:
            return None
    if any(".label_emb." in k for k in unet_keys):
        return "SDXL-refiner" if _max_index(unet_keys, "input_blocks") >= 10 else "SDXL"
    for k in unet_keys:
        if k.endswith(".proj_in.weight"):
            return "SD2" if len(_shape(shapes[k])) == 2 else "SD1"
    return "SD1"


def detect(shapes: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> ArchInfo:
    """Classify a state dict given its keys and shapes (tensors, ``TensorInfo`` or shape tuples).

    ``metadata`` (the file's safetensors metadata) adds what only it can say: the prediction type where no marker
    key says it, and the base family a ``modelspec.*`` / ``ss_*`` field names. The architecture is decided from
    the keys alone."""
    info = _detect_keys(shapes)
    if info.architecture in ("SD1", "SD2", "SDXL", "SDXL-refiner", "Flux.1"):
        from .markers import family_of, prediction_of

        pred = prediction_of(shapes, metadata, info.architecture)
        info.prediction, info.prediction_source = pred["prediction"], pred["prediction_source"]
        info.ztsnr, info.markers = bool(pred["ztsnr"]), list(pred["markers"])
        info.notes.extend(pred["notes"])
        info.named_family, info.named_family_source = family_of(metadata)
    return info


def _detect_keys(shapes: Mapping[str, Any]) -> ArchInfo:
    keys = list(shapes)
    if not keys:
        return ArchInfo("unknown", notes=["no tensors"])
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    n_lora = sum(1 for k in keys if _LORA_RE.search(k))
    if n_lora and n_lora * 4 >= len(keys) and not any(k.endswith("input_blocks.0.0.weight") for k in unet_keys):
        return ArchInfo("LoRA")
    if any(_CONTROLNET_RE.search(k) for k in keys) and not any(k.startswith("first_stage_model.") for k in keys):
        return ArchInfo("ControlNet")

    from .dit import detect_dit, vae_variant

    dit = detect_dit(shapes)
    if dit is not None:
        return ArchInfo(dit["architecture"], dit["variant"], dit["prefixes"], dit["notes"], layout=dit["layout"],
                        roots=dit["roots"])

    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    notes: List[str] = []
    # each family's last text encoder is its own (SDXL: OpenCLIP-G at embedders.1; refiner: at embedders.0)
    arch: Optional[str] = next((name for name, fam in FAMILIES.items() if has(fam.text_encoders[-1].prefix)), None)
    fam = _unet_family(shapes, unet_keys)
    if arch is None and fam is not None:
        arch = fam
        notes.append("no text encoder in the file; architecture told from the UNet alone")
    if arch is None:
        vae_keys = [k for k in keys if _VAE_BARE_RE.match(k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k)]
        if any("decoder.conv_out" in k for k in vae_keys) or any("encoder.conv_in" in k for k in vae_keys):
            prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in vae_keys) else ""
            return ArchInfo("VAE", vae_variant(shapes, prefix), prefixes={"vae": prefix}, layout="component")
        return ArchInfo("unknown")
    if fam is not None and fam != arch:
        notes.append(f"the UNet looks like {fam} but the text encoder like {arch}")
    variant = None
    first = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first is not None:
        fshape = _shape(first)
        if len(fshape) != 4:  # a UNet's first layer is a 2-D conv [out, in, k, k]; anything else is not a UNet
            return ArchInfo("unknown", notes=[
                f"the first UNet conv ({UNET_PREFIX}input_blocks.0.0.weight) has shape {list(fshape)}, not "
                f"[out, in, k, k]: not a UNet this tool knows"])
        cin = fshape[1]
        variant = {9: "inpainting", 8: "instruct-pix2pix", 5: "depth"}.get(cin)
    prefixes = dict(_PREFIXES[arch])
    if variant == "depth":
        prefixes["depth_model"] = "depth_model."  # SD2 depth: the MiDaS estimator ships inside the checkpoint
    return ArchInfo(arch, variant, prefixes, notes)


# ---------------------------------------------------------------------------------------------------------------
# components

#: keys that legitimately appear under a component prefix although a module's state_dict may not list them
OPTIONAL_COMPONENT_KEYS = re.compile(
    r"(embeddings\.position_ids$|\.logit_scale$|\.text_projection(\.weight)?$|\.attn_mask$)")


def _layout_names(architecture: str) -> Optional[frozenset]:
    try:
        from .layouts import load_layout  # written from the real modules; see samples.gen_layouts
    except ImportError:
        return None
    try:
        return frozenset(load_layout(architecture))
    except (FileNotFoundError, KeyError, ValueError):
        return None


def component_of(key: str, info: ArchInfo, layout: Optional[frozenset] = None) -> str:
    """The component a key belongs to: unet, vae, text_encoder, text_encoder_2, ema or junk.

    LoRA files: unet / text_encoder / text_encoder_2 by the kohya or diffusers prefix.  ControlNet: ``controlnet``.
    """
    if info.architecture == "LoRA":
        k = key.lower()
        if k.startswith(("lora_te2_", "text_encoder_2.", "te2.")):
            return "text_encoder_2"
        if k.startswith(("lora_te", "text_encoder.", "te.", "te1.")):
            return "text_encoder"
        return "unet"
    if info.architecture == "ControlNet":
        return "controlnet"
    if key.startswith(EMA_PREFIX):
        return "ema"
    if key in _MARKERS and info.architecture not in ("VAE", "CLIP-L", "CLIP-G", "CLIP", "T5"):
        return "marker"
    if info.architecture == "VAE":
        rest = key[len(VAE_PREFIX):] if key.startswith(VAE_PREFIX) else key
        return "vae" if _VAE_BARE_RE.match(rest) and not key.startswith("loss") else "junk"
    for comp, roots in info.roots.items():
        if not info.prefixes.get(comp) and key.startswith(roots):
            return comp
    for comp, prefix in info.prefixes.items():
        if prefix and key.startswith(prefix):
            if layout is not None and key not in layout and not OPTIONAL_COMPONENT_KEYS.search(key):
                # old (NAI-era) SD1 CLIP names lack the ``text_model.`` level; they are the text encoder, not junk
                if not (key.startswith(OLD_CLIP_PREFIX) and OLD_CLIP_PREFIX + "text_model." + key[len(OLD_CLIP_PREFIX):]
                        in layout):
                    return "junk"
            return comp
    return "junk"


from .markers import MARKER_KEYS as _MARKER_KEYS  # noqa: E402 - after ArchInfo; markers imports nothing of ours

_MARKERS = frozenset(_MARKER_KEYS)

#: SD1 CLIP keys in the old layout (``cond_stage_model.transformer.encoder...``) that the WebUI renames on load
OLD_CLIP_PREFIX = "cond_stage_model.transformer."


def split_components(keys: Iterable[str], info: ArchInfo, use_layout: bool = True) -> Dict[str, List[str]]:
    """Group keys by component (see :func:`component_of`); every key lands in exactly one group."""
    # variant UNets (inpainting, pix2pix) have the same key names as the base layout: only names are checked
    layout = _layout_names(info.architecture) if use_layout and info.is_checkpoint else None
    out: Dict[str, List[str]] = {}
    for k in keys:
        out.setdefault(component_of(k, info, layout), []).append(k)
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLIP position_ids

def position_ids_key(keys: Iterable[str]) -> Optional[str]:
    ks = set(keys)
    for k in POSITION_ID_KEYS:
        if k in ks:
            return k
    return None


def position_ids_state(tensor: Optional[torch.Tensor]) -> Dict[str, Any]:
    """``{"state": "ok"|"broken"|"missing", "dtype": ..., "wrong": [indices]}``.

    Broken means a float tensor (a naive merge interpolated it) or values that are not exactly 0..N-1; the
    ``wrong`` list gives the indices whose value, read as the WebUI reads it (cast to int64), is wrong.
    """
    if tensor is None:
        return {"state": "missing", "dtype": None, "wrong": []}
    flat = tensor.reshape(-1)
    expected = torch.arange(flat.numel())
    as_int = flat.to(torch.int64) if flat.dtype.is_floating_point else flat.to(torch.int64)
    wrong = (as_int != expected).nonzero().reshape(-1).tolist()
    exact = bool(torch.equal(flat.double(), expected.double()))
    broken = flat.dtype.is_floating_point or not exact or bool(wrong)
    return {"state": "broken" if broken else "ok", "dtype": str(tensor.dtype).replace("torch.", ""),
            "wrong": wrong}


def fixed_position_ids(n: int = 77) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).reshape(1, n)


__all__ = [
    "ARCHITECTURES", "COMPONENTS", "ArchInfo", "detect", "component_of", "split_components", "block_names",
    "block_of_key", "position_ids_key", "position_ids_state", "fixed_position_ids", "POSITION_ID_KEYS",
    "UNET_PREFIX", "VAE_PREFIX", "EMA_PREFIX", "base_arch", "LAYOUTS",
]
