"""Resize a LoRA / LoCon: each layer's ΔW replaced by its best approximation at a new rank.

For every plain LoRA/LoCon module (``lora_up``/``lora_down``, linear or conv, with or without the CP ``lora_mid``)
the unscaled product up @ down is re-factored by its exact truncated SVD (:func:`lowrank.factored`: QR of both
factors and the SVD of the r×r core; a CP module through its full ΔW), at ``rank`` or at the rank a dynamic rule
picks (kohya's ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``, ``rank`` being the cap). The new alpha keeps the
file's scale: ``alpha' = (alpha / r) · r'`` (kohya's rule), so ΔW' = scale · up' @ down' is the truncated SVD of
ΔW. A module without an alpha key has scale 1 and stays without one.

Everything else is written unchanged and counted: modules of other types (LoHa, LoKr, full, IA3, norm, OFT: their
ΔW is not a product of two factors, or depends on the model's weight), DoRA modules (their ΔW depends on W), bundled
embeddings and keys of no module. (A layer whose rank is already at or below the new one is re-factored
exactly at its own rank.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..errors import InvalidInputError
from ..files import StreamingSafetensorsWriter, check_output_path, open_model
from . import formats, lowrank
from .network import group_modules, guess_lora_arch

PathLike = Union[str, "os.PathLike[str]"]
DYNAMIC = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _check_rule(rule: str, param: Optional[float]) -> None:
    if rule not in DYNAMIC:
        raise InvalidInputError(f"dynamic method must be one of {', '.join(DYNAMIC)}, got {rule!r}")
    if rule == "fixed":
        return
    if param is None:
        raise InvalidInputError(f"{rule} needs a parameter (dynamic_param)")
    if rule == "sv_ratio" and not param >= 1.0:
        raise InvalidInputError(f"sv_ratio keeps singular values above s_max / ratio: the ratio must be >= 1, "
                                f"got {param}")
    if rule in ("sv_fro", "sv_cumulative") and not 0.0 < param <= 1.0:
        raise InvalidInputError(f"{rule} is a fraction: 0 < dynamic_param <= 1, got {param}")


def _is_plain_lora(parts: Dict[str, str]) -> bool:
    return formats.classify(set(parts)) == "lora" and "dora_scale" not in parts and "scale" not in parts


def resize_lora(path: PathLike, out: PathLike, rank: int, dynamic: str = "fixed", dynamic_param: Optional[float] = None,
                dtype: Optional[str] = None, device: str = "cpu", overwrite: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Write ``out`` = ``path`` with every LoRA/LoCon module at ``rank`` (or the dynamic rule's rank, at most
    ``rank``). Returns a summary: per layer the old and new rank and the kept energy, sizes before and after."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"rank must be an integer >= 1, got {rank!r}")
    _check_rule(dynamic, dynamic_param)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)} (or left out: keep the file's)")
    src = Path(path)
    outp = check_output_path(out, [src], overwrite)
    if outp.suffix.lower() != ".safetensors":
        raise InvalidInputError("the resized LoRA is written as .safetensors", outp)
    dev = torch.device(device)
    with open_model(src) as r:
        keys = r.keys()
        meta = dict(r.metadata)
        arch = guess_lora_arch(keys, meta) or "SD1"
        groups, _ = group_modules(keys, arch)
        todo = [(mod, parts) for mod, parts in groups.items() if parts and _is_plain_lora(parts)]
        if not todo:
            raise InvalidInputError("no LoRA/LoCon module (lora_up/lora_down) to resize in this file", src)
        new: Dict[str, torch.Tensor] = {}
        layers: List[Dict[str, Any]] = []
        for i, (mod, parts) in enumerate(todo):
            up0, down0 = r.get(parts["lora_up.weight"]), r.get(parts["lora_down.weight"])
            mid0 = r.get(parts["lora_mid.weight"]) if "lora_mid.weight" in parts else None
            old_rank = int(down0.shape[0])
            alpha = float(r.get(parts["alpha"]).float().reshape(-1)[0]) if "alpha" in parts else None
            scale = alpha / old_rank if alpha else 1.0
            out_dim = int(up0.shape[0])
            if mid0 is not None:
                from .formats import lora as lora_fmt

                t = {"lora_up.weight": up0.to(dev, torch.float32), "lora_down.weight": down0.to(dev, torch.float32),
                     "lora_mid.weight": mid0.to(dev, torch.float32)}
                full = lora_fmt.delta(t, torch.empty(0, device="meta"))[0]
                shape_tail = tuple(full.shape[1:])
                tr = lowrank.truncated(full.reshape(out_dim, -1), rank, dynamic, dynamic_param, mode="full")
            else:
                shape_tail = tuple(down0.shape[1:])
                tr = lowrank.factored(up0.reshape(out_dim, old_rank).to(dev, torch.float32),
                                      down0.reshape(old_rank, -1).to(dev, torch.float32), rank, dynamic,
                                      dynamic_param)
            k = tr.rank
            conv = len(shape_tail) == 3
            up = tr.up.reshape(out_dim, k, 1, 1) if conv else tr.up
            down = tr.down.reshape(k, *shape_tail)
            wdt = DTYPES[dtype] if dtype else up0.dtype
            new[parts["lora_up.weight"]] = up.to("cpu", wdt).contiguous()
            new[parts["lora_down.weight"]] = down.to("cpu", wdt).contiguous()
            if "alpha" in parts:
                a0 = r.info(parts["alpha"])
                new[parts["alpha"]] = torch.tensor(scale * k, dtype=DTYPES[dtype] if dtype else a0.dtype
                                                   ).reshape(a0.shape)
            layers.append({"name": mod, "rank_before": old_rank, "rank": k, "energy": round(tr.energy, 6)})
            if progress:
                progress(i + 1, len(todo))
        dropped = {parts["lora_mid.weight"] for _, parts in todo if "lora_mid.weight" in parts}
        order = [k for k in keys if k not in dropped]
        specs = []
        for k in order:
            if k in new:
                specs.append((k, new[k].dtype, tuple(new[k].shape)))
            else:
                specs.append(r.info(k))
        ranks = sorted({x["rank"] for x in layers})
        meta["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
        alphas = sorted({float(v.float().reshape(-1)[0]) for k, v in new.items() if k.endswith("alpha")})
        if alphas:
            meta["ss_network_alpha"] = f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic"
        meta["sdtoolkit_resize"] = json.dumps({"from": src.name, "rank": rank, "dynamic_method": dynamic,
                                               "dynamic_param": dynamic_param})
        with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
            for k in order:
                w.write(k, new[k] if k in new else r.get(k).contiguous())
    kept = [m for m, parts in groups.items() if not (parts and _is_plain_lora(parts))]
    return {"output": str(outp), "arch": arch, "layers": len(layers), "kept_as_is": len(kept),
            "kept_examples": kept[:5], "size_before": src.stat().st_size, "size_after": outp.stat().st_size,
            "min_energy": min(x["energy"] for x in layers), "layer_report": layers}


__all__ = ["resize_lora", "DYNAMIC"]
