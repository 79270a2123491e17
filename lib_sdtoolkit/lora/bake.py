"""Bake networks into a checkpoint: W' = W + Σ m·ΔW per layer (ΔW in fp32, cast once to the stored dtype),
streamed key by key from the input into :class:`lib_sdtoolkit.files.StreamingSafetensorsWriter`.

A LoRA may carry lora-block-weight's ``lbw=`` (a preset name or a list, :mod:`.blocks`): then m of a layer is the
LoRA's multiplier times the weight of the layer's block, as ``<lora:name:m:lbw=...>`` applies it at generation."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..arch import detect
from ..arch.families import base_arch
from ..errors import ArchitectureError, InvalidInputError
from ..files import StreamingSafetensorsWriter, check_output_path, open_model
from . import formats
from .blocks import block_weight, resolve_block_weights
from .network import BoundLayer, Network, check_shapes, load_network
from ..validate import finite

#: largest |multiplier| a bake accepts (the WebUI's slider goes to 2; scripts use up to ~10)
MAX_MULTIPLIER = 100.0

PathLike = Union[str, "os.PathLike[str]"]


def _block_factors(loras: Sequence[tuple], arch: str) -> List[Optional[Dict[str, float]]]:
    """Each LoRA's block weights for ``arch`` (None without ``lbw``); a bad spec names the LoRA file."""
    out: List[Optional[Dict[str, float]]] = []
    for item in loras:
        lbw = item[2] if len(item) > 2 else None
        try:
            out.append(resolve_block_weights(lbw, arch))
        except InvalidInputError as exc:
            raise InvalidInputError(f"lbw of {Path(item[0]).name}: {exc}", item[0]) from None
    return out


def _record(loras: Sequence[tuple]) -> str:
    return json.dumps([dict({"lora": Path(it[0]).name, "multiplier": it[1]},
                            **({"lbw": it[2]} if len(it) > 2 and it[2] else {})) for it in loras])


def bake(checkpoint: PathLike, loras: Sequence[tuple], out: PathLike, overwrite: bool = False,
         progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    """Write ``out`` = ``checkpoint`` with ``loras`` merged in: each ``(path, multiplier)`` or ``(path, multiplier,
    lbw)`` (``lbw``: a block-weight preset or list, None for none). Returns a summary."""
    if not loras:
        raise InvalidInputError("no LoRA given to bake")
    loras = [tuple(it) for it in loras]
    for p, m, *_ in loras:  # a NaN / Inf multiplier would write a checkpoint full of NaN
        finite(m, f"multiplier of {Path(p).name}", -MAX_MULTIPLIER, MAX_MULTIPLIER)
    outp = check_output_path(out, [checkpoint, *[it[0] for it in loras]], overwrite)
    if outp.suffix.lower() != ".safetensors":
        raise InvalidInputError("the baked checkpoint is written as .safetensors", outp)
    with open_model(checkpoint) as r:
        infos = r.infos()
        a = detect(infos)
        if a.architecture == "Flux.1" and a.layout != "component":
            return _bake_flux(r, infos, a, loras, outp, overwrite, progress)
        if not a.is_checkpoint:
            raise ArchitectureError(f"not a Stable Diffusion checkpoint ({a.architecture})", r.path)
        arch = base_arch(a.architecture)
        factors = _block_factors(loras, arch)
        shapes = {k: i.shape for k, i in infos.items()}
        nets: List[Tuple[Network, float, Optional[Dict[str, float]]]] = []
        for (p, m, *_), bw in zip(loras, factors):
            net = load_network(p, arch)
            check_shapes(net, shapes)
            nets.append((net, float(m), bw))
        by_key: Dict[str, List[Tuple[BoundLayer, float]]] = {}
        # bias deltas (full ``diff_b``, norm ``b_norm``, ``bias``, LoRA ``lora_up.bias``) do not depend on W:
        # computed up front, since a file may store a bias before its weight
        biases: Dict[str, torch.Tensor] = {}
        for net, m_net, bw in nets:
            for layer in net.layers:
                m = m_net if bw is None else m_net * block_weight(bw, layer.block)
                by_key.setdefault(layer.weight_key, []).append((layer, m))
                db = formats.bias_delta(layer.weights)
                if db is None or layer.bias_key not in infos:
                    continue
                d = db * m
                if layer.target.qkv_index is not None:
                    full = torch.zeros(infos[layer.bias_key].shape[0])
                    n = full.shape[0] // 3
                    full[layer.target.qkv_index * n:(layer.target.qkv_index + 1) * n] = d
                    d = full
                biases[layer.bias_key] = d if layer.bias_key not in biases else biases[layer.bias_key] + d
        meta = dict(r.metadata) if r.format == "safetensors" else {}
        meta["sdtoolkit_lora_bake"] = _record(loras)
        keys = r.keys()
        specs = [infos[k] for k in keys]
        touched = 0
        with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
            for i, k in enumerate(keys):
                t = r.get(k)
                contribs = by_key.get(k)
                if contribs:
                    acc = t.float()
                    for layer, m in contribs:
                        rows = None
                        if layer.target.qkv_index is not None:
                            n = t.shape[0] // 3
                            rows = slice(layer.target.qkv_index * n, (layer.target.qkv_index + 1) * n)
                        base = t if rows is None else t[rows]
                        dw, _ = formats.compute_delta(layer.weights, base, None)
                        (acc if rows is None else acc[rows]).add_(dw, alpha=formats.effective_multiplier(
                            layer.weights, m))
                    if k in biases:
                        acc = acc + biases.pop(k)
                    t = acc.to(infos[k].dtype)
                    touched += 1
                elif k in biases:
                    t = (t.float() + biases.pop(k)).to(infos[k].dtype)
                    touched += 1
                w.write(k, t.contiguous())
                if progress:
                    progress(i + 1, len(keys))
    return {"output": str(outp), "arch": arch, "touched": touched,
            "loras": [_entry(it, {"layers": len(n.layers), "unmatched": len(n.unmatched)})
                      for it, (n, _, _) in zip(loras, nets)]}


def _entry(item: tuple, extra: Dict[str, object]) -> Dict[str, object]:
    """One LoRA of the summary: path, multiplier, lbw when given, then ``extra``."""
    out: Dict[str, object] = {"path": str(item[0]), "multiplier": item[1]}
    if len(item) > 2 and item[2]:
        out["lbw"] = item[2]
    out.update(extra)
    return out


def _bake_flux(r, infos, a, loras, outp, overwrite, progress) -> Dict[str, object]:
    """The Flux path of :func:`bake`: patches through :class:`.fluxbake.FluxPatches` (any checkpoint layout, fused
    weights patched by row offset, the ΔW of a layer spread over several keys computed once)."""
    from .fluxbake import FluxPatches

    shapes = {k: i.shape for k, i in infos.items()}
    factors = _block_factors(loras, "Flux.1")
    nets = [(load_network(it[0], "Flux.1"), float(it[1])) for it in loras]
    layers = [(layer, m if bw is None else m * block_weight(bw, layer.block))
              for (net, m), bw in zip(nets, factors) for layer in net.layers]
    files = [it[0] for it, (net, _) in zip(loras, nets) for _layer in net.layers]
    patches = FluxPatches(layers, a.layout or "bfl", a.prefixes, shapes, r.path, files)
    meta = dict(r.metadata) if r.format == "safetensors" else {}
    meta["sdtoolkit_lora_bake"] = _record(loras)
    keys = r.keys()
    touched = 0
    specs = [(k, infos[k].dtype, patches.widen.get(k, infos[k].shape)) for k in keys]
    with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
        for i, k in enumerate(keys):
            t = r.get(k)
            acc = patches.apply(k, t, r)
            if acc is not None:
                t = acc.to(infos[k].dtype)
                touched += 1
            w.write(k, t.contiguous())
            if progress:
                progress(i + 1, len(keys))
    out = []
    i0 = 0
    for it, (n, _) in zip(loras, nets):
        absent = sum(1 for pl in patches.places[i0:i0 + len(n.layers)] if not pl)
        i0 += len(n.layers)
        out.append(_entry(it, {"layers": len(n.layers) - absent, "unmatched": len(n.unmatched),
                               "not_in_checkpoint": absent}))
    res: Dict[str, object] = {"output": str(outp), "arch": "Flux.1", "touched": touched, "loras": out}
    if patches.widen:   # a control LoRA: the result takes the control image's latents beside the noise
        res["widened"] = {k: {"from": list(infos[k].shape), "to": list(s)} for k, s in patches.widen.items()}
    return res


__all__ = ["bake", "MAX_MULTIPLIER"]
