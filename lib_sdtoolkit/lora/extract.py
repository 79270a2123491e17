"""Extract a LoRA from the difference of two checkpoints (tuned − base) by truncated SVD, per layer.

Both inputs are read lazily, one layer at a time; only the factors are kept until they are written (kohya key
names, ``alpha = rank`` so the scale is 1, and the ``ss_*`` metadata the WebUI's Lora extension reads).
Attention layers (attn1/attn2 q/k/v/out, ff, proj_in/out) and the text encoders' attention/MLP are extracted at
``rank``; with ``conv_rank`` also the ResNet and up/down-sampler layers (convs at ``conv_rank``, linears at ``rank``).

Faithful by default: the factors are the SVD's, so a difference whose rank is at most ``rank`` comes back to the
output dtype's precision. ``clamp_quantile`` (kohya's 0.99 is lossy: ~4 % relative error on an exactly low-rank
difference) clamps the factors' entries at that quantile of their magnitudes only when given (1 or None: off).
``rank_mode="energy"`` picks each layer's rank as the smallest that keeps ``energy`` of ‖ΔW‖²_F (``rank`` is then
the cap). The SVD is randomised for large layers (:mod:`lib_sdtoolkit.lora.lowrank`). The summary lists every
layer with its rank and kept energy. Layers that are identical in both files are skipped.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..arch import detect, keymaps
from ..arch.families import base_arch
from ..errors import ArchitectureError, InvalidInputError
from ..files import StreamingSafetensorsWriter, check_output_path, open_model
from ..validate import check_device, finite
from . import lowrank

PathLike = Union[str, "os.PathLike[str]"]
_ATTN = ("attn1", "attn2", ".ff.", "proj_in", "proj_out", "self_attn", "attn.in_proj", "attn.out_proj", ".mlp.")
_BASE_VERSION = {"SD1": "sd_v1", "SD2": "sd_v2", "SDXL": "sdxl_base_v1-0", "SDXL-refiner": "sdxl_refiner_v1-0"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _targets(arch: str) -> List[Tuple[str, keymaps.LoraTarget]]:
    """(kohya name, target) once per target, in the spelling kohya writes."""
    out, seen = [], set()
    for _, t in keymaps.kohya_lora_names(arch).items():
        k = (t.module, t.qkv_index)
        if k in seen:
            continue
        seen.add(k)
        mod = t.module + ("#" + "qkv"[t.qkv_index] if t.qkv_index is not None else "")
        try:
            out.append((keymaps.kohya_name_of_module(mod, arch), t))
        except KeyError:
            continue
    return out


def _is_attention(module: str) -> bool:
    return any(a in module + "." for a in _ATTN)


def _clamp(u: torch.Tensor, vh: torch.Tensor, q: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    if q is None or q >= 1.0:
        return u, vh
    dist = torch.cat([u.flatten(), vh.flatten()]).abs()
    k = max(1, min(dist.numel(), int(round(q * dist.numel()))))
    hi = dist.kthvalue(k).values
    return u.clamp(-hi, hi), vh.clamp(-hi, hi)


def svd_factors(diff: torch.Tensor, rank: int, clamp_quantile: Optional[float] = None, rank_mode: str = "fixed",
                energy: Optional[float] = None, svd: str = "auto"
                ) -> Tuple[torch.Tensor, torch.Tensor, float, str]:
    """(up, down, kept energy, svd method) with up @ down ≈ diff (2-D or conv 4-D), shapes as kohya stores them.
    The kept energy is measured on the factors as written (after a clamp), against ``diff``."""
    out_dim = diff.shape[0]
    mat = diff.reshape(out_dim, -1).float()
    tr = lowrank.truncated(mat, rank, rank_mode, energy, svd)
    u, vh = tr.up, tr.down
    kept = tr.energy
    if clamp_quantile is not None and clamp_quantile < 1.0:
        u, vh = _clamp(u, vh, clamp_quantile)
        kept = lowrank.kept_energy(mat, u, vh)
    r = u.shape[1]
    if diff.dim() == 4:
        return u.reshape(out_dim, r, 1, 1), vh.reshape(r, *diff.shape[1:]), kept, tr.method
    return u, vh, kept, tr.method


def extract_lora(tuned: PathLike, base: PathLike, out: PathLike, rank: int = 32, conv_rank: Optional[int] = None,
                 clamp_quantile: Optional[float] = None, device: str = "cpu", dtype: str = "fp16",
                 overwrite: bool = False, progress: Optional[Callable[[int, int], None]] = None,
                 min_diff: float = 0.0, rank_mode: str = "fixed", energy: float = 0.95,
                 svd: str = "auto") -> Dict[str, object]:
    """Write ``out`` (.safetensors) and return a summary (layers, rank, arch, skipped, per-layer rank and kept
    energy)."""
    if rank_mode not in ("fixed", "energy"):
        raise InvalidInputError(f"rank mode must be fixed or energy, got {rank_mode!r}")
    if svd not in lowrank.SVD_MODES:
        raise InvalidInputError(f"svd must be one of {', '.join(lowrank.SVD_MODES)}, got {svd!r}")
    energy = finite(energy, "energy", 0.0, 1.0)
    if energy <= 0.0:
        raise InvalidInputError("energy must be > 0 (the fraction of each layer's ‖ΔW‖² to keep)")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise InvalidInputError("rank and conv-rank must be >= 1")
    if clamp_quantile is not None and not (isinstance(clamp_quantile, (int, float))
                                           and math.isfinite(float(clamp_quantile)) and float(clamp_quantile) > 0):
        raise InvalidInputError(f"clamp quantile must be a finite number > 0 (1 = off), got {clamp_quantile!r}")
    if not (isinstance(min_diff, (int, float)) and math.isfinite(float(min_diff))):
        raise InvalidInputError(f"min_diff must be a finite number, got {min_diff!r}")
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}")
    if clamp_quantile is not None:
        clamp_quantile = finite(clamp_quantile, "clamp_quantile", 0.0, 1.0)
    device = check_device(device)
    outp = check_output_path(out, [tuned, base], overwrite)
    if outp.suffix.lower() != ".safetensors":
        raise InvalidInputError("the extracted LoRA is written as .safetensors", outp)
    dev = torch.device(device)
    # one torch thread for the per-layer SVDs on CPU: the matrices are small (q = rank + oversampling columns), so a
    # second OpenMP thread gains little on an idle machine and on a busy one the two threads wait for each other
    # (five SD1.5 layer shapes, randomised, under load ~25 on 2 cores: 2 threads 156-204 s wall / 7.8 s CPU,
    # 1 thread 27-30 s wall / 0.9 s CPU); restored afterwards
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        with open_model(tuned) as rt, open_model(base) as rb:
            at, ab = detect(rt.infos()), detect(rb.infos())
            if ab.architecture == "Flux.1" and ab.layout != "component":  # lora/extract_flux.py: fused layers as one
                from .extract_flux import extract_flux
                res = extract_flux(rt, rb, at, ab, outp, rank,
                                   lambda d, r, cq: svd_factors(d, r, cq, rank_mode, energy, svd), clamp_quantile,
                                   dev, DTYPES[dtype], overwrite, progress, min_diff,
                                   (Path(tuned).name, Path(base).name))
                return dict(res, rank_mode=rank_mode, energy=energy if rank_mode == "energy" else None,
                            clamp_quantile=clamp_quantile)
            if not ab.is_checkpoint:
                raise ArchitectureError(f"not a Stable Diffusion checkpoint ({ab.architecture})", rb.path)
            if at.family != ab.family:
                raise ArchitectureError(f"tuned model is {at.architecture}, base is {ab.architecture}", rt.path)
            arch = base_arch(ab.architecture)
            todo = []
            for name, t in _targets(arch):
                wk = t.weight_key
                if wk not in rt or wk not in rb:
                    continue
                if rt.info(wk).shape != rb.info(wk).shape:
                    raise ArchitectureError(f"shapes differ: {rt.info(wk).shape} vs {rb.info(wk).shape}", rt.path, wk)
                attn = _is_attention(t.module)
                is_conv = len(rb.info(wk).shape) == 4 and rb.info(wk).shape[2:] != (1, 1)
                if not attn and conv_rank is None:
                    continue
                r = conv_rank if (is_conv and conv_rank is not None) else rank
                todo.append((name, t, r))
            factors: Dict[str, torch.Tensor] = {}
            per_layer: List[Dict[str, object]] = []
            skipped = 0
            for i, (name, t, r) in enumerate(todo):
                a = rt.get(t.weight_key).to(dev, torch.float32)
                b = rb.get(t.weight_key).to(dev, torch.float32)
                if t.qkv_index is not None:
                    n = a.shape[0] // 3
                    a, b = a[t.qkv_index * n:(t.qkv_index + 1) * n], b[t.qkv_index * n:(t.qkv_index + 1) * n]
                diff = a - b
                del a, b
                if float(diff.abs().max()) <= min_diff:
                    skipped += 1
                    continue
                up, down, kept, method = svd_factors(diff, r, clamp_quantile, rank_mode, energy, svd)
                per_layer.append({"name": name, "rank": int(up.shape[1]), "energy": round(kept, 6), "svd": method})
                factors[name + ".lora_up.weight"] = up.to("cpu", DTYPES[dtype]).contiguous()
                factors[name + ".lora_down.weight"] = down.to("cpu", DTYPES[dtype]).contiguous()
                factors[name + ".alpha"] = torch.tensor(float(up.shape[1]), dtype=DTYPES[dtype])
                if progress:
                    progress(i + 1, len(todo))
        if not factors:
            raise InvalidInputError("the two models do not differ in any LoRA target layer; nothing to extract", tuned)
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
            "ss_base_model_version": _BASE_VERSION.get(arch, arch),
            "ss_v2": str(arch == "SD2"),
            "ss_output_name": outp.stem,
            "ss_training_comment": f"extracted by sd-toolkit from {Path(tuned).name} - {Path(base).name}",
            "ss_sd_model_name": Path(base).name,
        }
        if conv_rank is not None:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in factors.items()]
        with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
            for k, v in factors.items():
                w.write(k, v)
        return {"output": str(outp), "arch": arch, "layers": len(factors) // 3, "skipped_identical": skipped,
                "rank": rank, "conv_rank": conv_rank, "rank_mode": rank_mode,
                "energy": energy if rank_mode == "energy" else None, "clamp_quantile": clamp_quantile,
                "min_energy": min(x["energy"] for x in per_layer), "layer_report": per_layer}
    finally:
        torch.set_num_threads(threads)
