"""``lora inspect``: what a network file is (types, ranks, alphas, targets, base model, metadata), how strong it is
per block, and which of its modules would not be applied and why.

Explain: every module the toolkit would not apply is listed with one of the reasons of
:data:`lib_sdtoolkit.lora.network.REASONS`:

* ``unknown target name``: the module's name maps to no layer of the architecture (or, with a checkpoint given,
  the checkpoint has no such layer);
* ``unsupported type``: its parts are of no network type the toolkit reads;
* ``shape mismatch`` (with a checkpoint): its ΔW does not fit that checkpoint's weight;
* ``wrong architecture`` (with a checkpoint): the file is made for another architecture (an SDXL LoRA on an SD1
  model); every module is listed, as the WebUI refuses the whole file.

Per block (the lora-block-weight blocks of the architecture): the number of layers and Σ‖ΔW‖_F of the layers
(scale included; for OFT/BOFT, whose ΔW depends on the model's weight, only with a checkpoint given).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..arch import detect, fluxmaps
from ..arch.blocks import LBW, convention
from ..arch.families import base_arch
from ..errors import ArchitectureError, SdToolkitError
from ..files import open_model
from . import formats
from . import fluxnames
from .names import is_flux, resolve_name
from .network import (SHAPE_MISMATCH, UNKNOWN_TARGET, UNSUPPORTED_TYPE, WRONG_ARCH, group_modules,
                      guess_lora_arch)
from .detect import detect_naming, unmatched_modules

PathLike = Union[str, "os.PathLike[str]"]


def _delta_norm(layer: formats.LayerWeights, shape: Optional[Tuple[int, ...]],
                weight: Optional[torch.Tensor]) -> Optional[float]:
    """‖ΔW‖_F of one module (scale included, no DoRA), or None when it needs the model's weight and none is given."""
    lr = formats.lowrank_factors(layer)
    if lr is not None:  # ‖s·U D‖² = s² tr((UᵀU)(D Dᵀ)): no out×in product
        up, down, s = lr
        g = (up.T @ up) * (down @ down.T)
        return abs(s) * math.sqrt(max(0.0, float(g.double().sum())))
    if layer.kind in ("oft", "ia3") or layer.dora_scale is not None:
        if weight is None:
            return None
        dw, _ = formats.compute_delta(layer, weight)
        return float(dw.double().norm())
    if shape is None:
        from .merge_loras import _natural_shape

        shape = _natural_shape(layer)
    if shape is None:
        return None
    dw, _ = layer.module.delta({k: v.float() for k, v in layer.t.items()}, torch.empty(shape, device="meta"), None)
    return abs(layer.effective_scale()) * float(dw.double().norm())


def inspect_lora(path: PathLike, model: Optional[PathLike] = None) -> Dict[str, Any]:
    p = Path(path)
    mr = open_model(model) if model is not None else None
    try:
        model_arch: Optional[str] = None
        model_infos = None
        if mr is not None:
            model_infos = mr.infos()
            a = detect(model_infos)
            if not a.is_checkpoint:
                raise ArchitectureError(f"not a Stable Diffusion checkpoint ({a.architecture})", mr.path)
            model_arch = base_arch(a.architecture)
        with open_model(p) as r:
            return _inspect(r, p, mr, model_arch, model_infos)
    finally:
        if mr is not None:
            mr.close()


def _inspect(r: Any, p: Path, mr: Any, model_arch: Optional[str], model_infos: Any) -> Dict[str, Any]:
    keys = r.keys()
    meta = dict(r.metadata)
    guessed = guess_lora_arch(keys, meta)
    lora_arch = guessed or "SD1"
    arch = model_arch or lora_arch
    groups, bundled = group_modules(keys, arch)
    naming = detect_naming(keys, arch)
    flux = is_flux(arch)  # Flux LoRA blocks: CLIP, T5, IN, Dnn, Snn, OUT (lora.fluxnames)
    try:
        blocks_conv = convention(LBW, arch)
    except SdToolkitError:
        blocks_conv = None
    kinds: Dict[str, int] = {}
    ranks: Dict[str, int] = {}
    alphas: Dict[str, int] = {}
    targets = {"unet": 0, "text_encoder": 0, "text_encoder_2": 0}
    blocks: Dict[str, Dict[str, Any]] = {}
    unmatched, unknown, conv, dora = [], [], 0, 0
    control = {"img_in_channels": None, "set_layers": 0}
    not_applied: List[Dict[str, str]] = []
    resolved = 0
    wrong_arch = False
    if model_arch is not None and guessed is not None:
        wrong_arch = (guessed == "SDXL") != model_arch.startswith("SDXL")
    for mod, parts in groups.items():
        kind = formats.classify(set(parts)) if parts else None
        if kind is None:
            unknown.append(mod)
            not_applied.append({"module": mod, "reason": UNSUPPORTED_TYPE,
                                "detail": f"parts {', '.join(sorted(parts)) or '(no network part)'}"})
            continue
        if kind == "oft" and "oft_blocks" in parts and len(r.info(parts["oft_blocks"]).shape) == 4:
            kind_label = "boft"
        else:
            kind_label = kind
        kinds[kind_label] = kinds.get(kind_label, 0) + 1
        infos = {part: r.info(k) for part, k in parts.items()}
        if "dora_scale" in parts:
            dora += 1
        if kind == "lora":
            rk = str(infos["lora_down.weight"].shape[0])
            ranks[rk] = ranks.get(rk, 0) + 1
            if len(infos["lora_down.weight"].shape) == 4 and infos["lora_down.weight"].shape[2:] != (1, 1):
                conv += 1
        if kind == "set":
            control["set_layers"] += 1
        if "alpha" in parts:
            a = f"{float(r.get(parts['alpha']).float().reshape(-1)[0]):g}"
            alphas[a] = alphas.get(a, 0) + 1
        t = resolve_name(mod, arch)
        if t is None:
            unmatched.append(mod)
            if not wrong_arch:
                not_applied.append({"module": mod, "reason": UNKNOWN_TARGET,
                                    "detail": f"no layer of a {arch} model has this name"})
            continue
        resolved += 1
        targets[t.component] = targets.get(t.component, 0) + 1
        if flux and t.component == "transformer" and t.module == "img_in" and kind == "lora":
            cin = int(infos["lora_down.weight"].shape[1])
            if cin > fluxmaps.LATENT_CHANNELS:
                control["img_in_channels"] = cin
        layer = formats.make_layer(mod, {part: r.get(k) for part, k in parts.items()}, str(p))
        shape = weight = None
        if model_infos is not None and not wrong_arch:
            info = model_infos.get(t.weight_key)
            if info is None:
                not_applied.append({"module": mod, "reason": UNKNOWN_TARGET,
                                    "detail": f"the checkpoint has no {t.weight_key}"})
                continue
            shape = tuple(info.shape)
            if t.qkv_index is not None:
                shape = (shape[0] // 3, *shape[1:])
            try:
                formats.check_layer(layer, shape)
                if layer.dora_scale is not None:
                    formats.dora_on_out(layer.dora_scale, shape)
            except ValueError as e:
                not_applied.append({"module": mod, "reason": SHAPE_MISMATCH, "detail": str(e)})
                continue
            if kind in ("oft", "ia3") or layer.dora_scale is not None:
                weight = mr.get(t.weight_key).float()
                if t.qkv_index is not None:
                    weight = weight[t.qkv_index * shape[0]:(t.qkv_index + 1) * shape[0]]
        if blocks_conv is not None or flux:
            try:
                b = fluxnames.block_of(t) if flux else blocks_conv.block_of(t.module)
            except SdToolkitError:
                b = "BASE"
            ent = blocks.setdefault(b, {"layers": 0, "norm": 0.0})
            ent["layers"] += 1
            try:
                n = _delta_norm(layer, shape, weight)
            except (ValueError, RuntimeError):
                n = None
            if n is not None and math.isfinite(n):
                ent["norm"] = round(ent["norm"] + n, 6)
    if wrong_arch:
        not_applied = [x for x in not_applied if x["reason"] == UNSUPPORTED_TYPE] + [
            {"module": m, "reason": WRONG_ARCH, "detail": f"a {guessed} network; the checkpoint is {model_arch}"}
            for m, parts in groups.items() if parts and formats.classify(set(parts)) is not None]
    counts: Dict[str, int] = {}
    for x in not_applied:
        counts[x["reason"]] = counts.get(x["reason"], 0) + 1
    # the longest list's order (Flux.1: lora-block-weight's CLIP, T5, IN, D00.., S00.., OUT), then any other block
    order = (list(dict.fromkeys(max(blocks_conv.lists.values(), key=len) + blocks_conv.blocks))
             if blocks_conv is not None else sorted(blocks, key=lambda b: (b != "BASE", b)))
    return {
        # "format" is the container (safetensors / pickle); "naming" the key-name convention (kohya, diffusers, ...)
        "path": str(p), "format": r.format, "file_size": r.file_size, "tensors": len(keys),
        "base_model": lora_arch, "types": kinds, "ranks": ranks, "alphas": alphas, "dora_layers": dora,
        "conv_kxk_layers": conv, "targets": {k: v for k, v in targets.items() if v},
        "unmatched": len(unmatched), "unmatched_examples": unmatched[:5], "unknown_modules": unknown[:5],
        "naming": naming, "unmatched_modules": unmatched_modules(keys, arch),
        "bundled_embeddings": sorted({k.split(".")[1] for k in bundled if k.count(".") >= 1}),
        "metadata": meta,
        "blocks": {b: blocks[b] for b in order if b in blocks},
        "model": str(mr.path) if mr is not None else None, "model_arch": model_arch,
        "not_applied": not_applied, "not_applied_counts": counts,
        "control": _control_summary(control) if flux else None,
    }


def _control_summary(c: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What makes a Flux LoRA a control LoRA (BFL Canny/Depth), or None when nothing does."""
    if c["img_in_channels"] is None and not c["set_layers"]:
        return None
    cin = c["img_in_channels"]
    return dict(c, note=(f"a Flux control LoRA (BFL Canny/Depth style): "
                         + (f"widens img_in from {fluxmaps.LATENT_CHANNELS} to {cin} input channels (the packed control "
                            f"image beside the latent); " if cin else "")
                         + (f"sets {c['set_layers']} qk-norm scales; " if c["set_layers"] else "")
                         + "bake it into a Flux dev checkpoint to get a control model; it is not applied at "
                           "generation"))
