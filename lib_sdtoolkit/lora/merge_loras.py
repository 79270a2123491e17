"""Merge LoRAs into one: ΔW = Σ w_i · ΔW_i per layer, written as one LoRA/LoCon file.

Each input's ΔW_i is its scale (alpha/rank) times its factors' product, so the alpha of every input is folded into
the merged factors and the merged file has ``alpha = rank`` (scale 1) on every layer:

* without ``rank``, when every input of a layer is a plain LoRA/LoCon (up/down): the factors are concatenated,
  up = [c_1·up_1 | c_2·up_2 | ...], down = [down_1; down_2; ...] with c_i = w_i · alpha_i/rank_i (split as
  sign·sqrt|c_i| on up and sqrt|c_i| on down, so the halves keep comparable magnitudes in fp16). Exact: the
  merged ΔW is the weighted sum, the rank the sum of the ranks;
* without ``rank``, when a layer has a LyCORIS input (LoHa, LoKr, full/diff, CP LoCon): the weighted sum of the
  full deltas is re-factored at its numerical rank (singular values above 1e-6·s_max: exact to fp32);
* with ``rank``: the best rank-``rank`` approximation of the weighted sum (the exact truncated SVD; through the
  concatenated factors when all inputs are low-rank, so no full ΔW is formed).

A layer's shape comes from its factors; a LoHa/LoKr half that stores a conv kernel flattened (out, in·k·k) gets
the kernel from the architecture's layout (or from ``model``, a checkpoint, when given). Types whose ΔW depends
on the model's weight (IA3, norm, OFT/BOFT, DoRA) and modules with a bias delta
are refused with the file and module named; bundled embeddings
are not carried over (they are listed in the summary).

The output's metadata: the kohya ``ss_*`` keys a loader reads, and ``sdtoolkit_merged_from``, a JSON list of
``{"file": name, "weight": w, "metadata": {...}}``, one per input in order, holding each input's own metadata.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..arch import keymaps
from ..arch.families import base_arch
from ..errors import ArchitectureError, InvalidInputError
from ..files import StreamingSafetensorsWriter, check_output_path, open_model
from . import formats, lowrank
from .network import group_modules, guess_lora_arch
from .names import resolve_name

PathLike = Union[str, "os.PathLike[str]"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: the metadata key holding the inputs (file, weight, their metadata)
MERGED_FROM = "sdtoolkit_merged_from"
#: singular values below this fraction of the largest are dropped by an exact (rank-less) merge
NUMERICAL_RANK_TOL = 1e-6
#: types whose ΔW depends on the model weight: not representable as one LoRA delta
_NEEDS_WEIGHT = {"ia3", "norm", "oft", "set"}


@dataclass
class _Part:
    """One input's contribution to one layer: low-rank (up, down) or a full ΔW, weight and scale folded in."""

    up: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    full: Optional[torch.Tensor]
    shape: Tuple[int, ...]


def _natural_shape(layer: formats.LayerWeights) -> Optional[Tuple[int, ...]]:
    t = layer.t
    if layer.kind == "lora":
        up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
        if mid is not None:
            return (int(up.shape[0]), int(down.shape[1]), *mid.shape[2:])
        return (int(up.shape[0]), *down.shape[1:])
    if layer.kind == "full":
        return tuple(t["diff"].shape)
    if layer.kind == "loha":
        if "hada_t1" in t:
            return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *t["hada_t1"].shape[2:])
        return (int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1]))
    if layer.kind == "lokr":
        w1 = t.get("lokr_w1")
        a, c = (w1.shape[0], w1.shape[1]) if w1 is not None else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        w2 = t.get("lokr_w2")
        if w2 is not None:
            return (int(a * w2.shape[0]), int(c * w2.shape[1]), *w2.shape[2:])
        if "lokr_t2" in t:
            return (int(a * t["lokr_w2_a"].shape[1]), int(c * t["lokr_w2_b"].shape[1]), *t["lokr_t2"].shape[2:])
        return (int(a * t["lokr_w2_a"].shape[0]), int(c * t["lokr_w2_b"].shape[1]))
    return None


def _fit_kernel(shape: Tuple[int, ...], ref: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    """A 2-D (out, in·k·k) shape given back its kernel from a reference 4-D shape (layout or checkpoint)."""
    if len(shape) != 2 or ref is None or len(ref) != 4:
        return shape
    kk = int(ref[2]) * int(ref[3])
    if shape[1] % kk:
        return shape
    return (shape[0], shape[1] // kk, int(ref[2]), int(ref[3]))


def _ref_shape(target: Any, layout: Dict[str, Tuple[int, ...]], model_shapes: Optional[Dict[str, Tuple[int, ...]]]
               ) -> Optional[Tuple[int, ...]]:
    if target is None:
        return None
    src = model_shapes if model_shapes is not None else layout
    s = src.get(target.weight_key)
    if s is None:
        return None
    s = tuple(int(x) for x in s)
    if target.qkv_index is not None:
        s = (s[0] // 3, *s[1:])
    return s


def merge_loras(inputs: Sequence[Tuple[PathLike, float]], out: PathLike, rank: Optional[int] = None,
                model: Optional[PathLike] = None, dtype: Optional[str] = None, device: str = "cpu",
                svd: str = "auto", overwrite: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Write ``out`` = Σ w_i · ``inputs[i]`` as one LoRA (see the module docstring). Returns a summary."""
    if not inputs:
        raise InvalidInputError("give at least one LoRA to merge")
    for p, w in inputs:
        if not (isinstance(w, (int, float)) and math.isfinite(float(w))):
            raise InvalidInputError(f"the weight of {Path(p).name} must be a finite number, got {w!r}", p)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise InvalidInputError(f"rank must be an integer >= 1, got {rank!r}")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}")
    if svd not in lowrank.SVD_MODES:
        raise InvalidInputError(f"svd must be one of {', '.join(lowrank.SVD_MODES)}")
    outp = check_output_path(out, [p for p, _ in inputs] + ([model] if model else []), overwrite)
    if outp.suffix.lower() != ".safetensors":
        raise InvalidInputError("the merged LoRA is written as .safetensors", outp)
    dev = torch.device(device)

    # 1. read every input: its architecture, modules, metadata
    arch: Optional[str] = None
    first_meta: Dict[str, str] = {}
    merged_from: List[Dict[str, Any]] = []
    order: List[Tuple[Any, str]] = []          # group keys in first-seen order
    names: Dict[Any, str] = {}                 # group key -> module name written
    contribs: Dict[Any, List[Tuple[formats.LayerWeights, float, Path, Any]]] = {}
    dropped_embeddings: List[str] = []
    seen_dtypes: set = set()
    for idx, (p, w) in enumerate(inputs):
        p = Path(p)
        with open_model(p) as r:
            keys = r.keys()
            meta = dict(r.metadata)
            a = guess_lora_arch(keys, meta) or "SD1"
            if arch is None:
                arch, first_meta = a, meta
            elif base_arch(a) != base_arch(arch):
                raise ArchitectureError(f"this is a {a} LoRA and {Path(inputs[0][0]).name} is {arch}; "
                                        f"LoRAs of different architectures cannot be merged", p)
            groups, bundled = group_modules(keys, arch)
            dropped_embeddings += [f"{p.name}:{k}" for k in bundled]
            for mod, parts in groups.items():
                kind = formats.classify(set(parts)) if parts else None
                if kind is None:
                    raise InvalidInputError(f"module of unknown type (parts {sorted(parts) or 'none'}): cannot be "
                                            f"merged", p, mod)
                if kind in _NEEDS_WEIGHT or "dora_scale" in parts:
                    what = "DoRA" if "dora_scale" in parts else kind.upper()
                    raise InvalidInputError(f"{what} module: its ΔW depends on the model's weight and is no LoRA "
                                            f"delta; cannot be merged", p, mod)
                if parts.keys() & {"bias", "diff_b", "lora_up.bias"}:
                    raise InvalidInputError("module with a bias delta: a LoRA file has no place for it; cannot "
                                            "be merged", p, mod)
                tensors = {part: r.get(k) for part, k in parts.items()}
                seen_dtypes.update(v.dtype for part, v in tensors.items()
                                   if v.is_floating_point() and part not in ("alpha", "scale"))
                layer = formats.make_layer(mod, tensors, str(p))
                bad = formats.nonfinite_parts(layer)
                if bad:
                    raise InvalidInputError(f"NaN or inf in {', '.join(bad)}", p, mod)
                target = resolve_name(mod, arch)
                gk = (target.module, target.qkv_index) if target is not None else ("raw", mod)
                if gk not in contribs:
                    contribs[gk] = []
                    order.append(gk)
                    names[gk] = mod
                contribs[gk].append((layer, float(w), p, target))
        merged_from.append({"file": p.name, "weight": float(w), "metadata": meta})
    assert arch is not None
    if not order:
        raise InvalidInputError("no network module in any input; nothing to merge", inputs[0][0])
    if dtype:
        out_dtype = DTYPES[dtype]
    elif seen_dtypes <= {torch.float16}:
        out_dtype = torch.float16
    elif seen_dtypes <= {torch.bfloat16}:
        out_dtype = torch.bfloat16
    else:  # fp32 inputs, or fp16 and bf16 mixed: fp32 holds both
        out_dtype = torch.float32
    layout = keymaps.load_layout(base_arch(arch))
    model_shapes = None
    if model is not None:
        with open_model(model) as r:
            model_shapes = {k: tuple(i.shape) for k, i in r.infos().items()}

    # 2. one layer at a time
    tensors_out: Dict[str, torch.Tensor] = {}
    report: List[Dict[str, Any]] = []
    for i, gk in enumerate(order):
        name = names[gk]
        parts_: List[_Part] = []
        shape: Optional[Tuple[int, ...]] = None
        for layer, w, p, target in contribs[gk]:
            ref = _ref_shape(target, layout, model_shapes)
            nat = _natural_shape(layer)
            if nat is None:
                raise InvalidInputError(f"cannot tell the shape of this {layer.kind} module", p, name)
            nat = _fit_kernel(nat, ref) if layer.kind in ("loha", "lokr") else nat
            c = w * layer.effective_scale()
            lr = formats.lowrank_factors(layer, device=dev)
            if lr is not None:
                up, down, _ = lr
                sq = math.sqrt(abs(c))
                parts_.append(_Part(up * (sq if c >= 0 else -sq), down * sq, None, nat))
            else:
                t = {k: v.to(dev, torch.float32) for k, v in layer.t.items()}
                dw, _ = layer.module.delta(t, torch.empty(nat, device="meta"), None)
                parts_.append(_Part(None, None, dw.reshape(nat[0], -1) * c, nat))
            if shape is None:
                shape = nat
            elif math.prod(shape) != math.prod(nat) or shape[0] != nat[0]:
                raise InvalidInputError(f"{p.name} has ΔW of shape {list(nat)} for this layer and "
                                        f"{contribs[gk][0][2].name} {list(shape)}", p, name)
            elif len(nat) > len(shape):
                shape = nat
        assert shape is not None
        out_dim = shape[0]
        lowrank_only = all(x.full is None for x in parts_)
        if lowrank_only:
            up = torch.cat([x.up for x in parts_], dim=1)
            down = torch.cat([x.down.reshape(x.down.shape[0], -1) for x in parts_], dim=0)
            if rank is None:
                k = int(up.shape[1])
                energy = 1.0
            else:
                tr = lowrank.factored(up, down, rank)
                up, down, k, energy = tr.up, tr.down, tr.rank, tr.energy
        else:
            total = torch.zeros(out_dim, math.prod(shape[1:]), device=dev)
            for x in parts_:
                total += x.full if x.full is not None else x.up @ x.down.reshape(x.down.shape[0], -1)
            if rank is None:
                u, s, vh = torch.linalg.svd(total, full_matrices=False)
                k = max(1, int((s > s[0] * NUMERICAL_RANK_TOL).sum())) if s.numel() and s[0] > 0 else 1
                up, down = u[:, :k] * s[:k], vh[:k]
                energy = lowrank.kept_energy(total, up, down)
            else:
                tr = lowrank.truncated(total, rank, "fixed", None, svd)
                up, down, k, energy = tr.up, tr.down, tr.rank, tr.energy
        conv = len(shape) == 4
        tensors_out[name + ".lora_up.weight"] = (up.reshape(out_dim, k, 1, 1) if conv else up).to("cpu", out_dtype)
        tensors_out[name + ".lora_down.weight"] = down.reshape(k, *shape[1:]).to("cpu", out_dtype)
        tensors_out[name + ".alpha"] = torch.tensor(float(k), dtype=out_dtype)
        report.append({"name": name, "inputs": len(parts_), "rank": k, "energy": round(float(energy), 6)})
        if progress:
            progress(i + 1, len(order))

    ranks = sorted({x["rank"] for x in report})
    meta_out = {k: v for k, v in first_meta.items() if k in ("ss_base_model_version", "ss_v2", "ss_sd_model_name")}
    meta_out.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_output_name": outp.stem,
        MERGED_FROM: json.dumps(merged_from),
    })
    if any(len(v.shape) == 4 and v.shape[2:] != (1, 1) for k, v in tensors_out.items() if k.endswith("down.weight")):
        meta_out["ss_network_args"] = json.dumps({"conv_dim": str(max(ranks)), "conv_alpha": str(max(ranks))})
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors_out.items()]
    with StreamingSafetensorsWriter(outp, specs, meta_out, overwrite=overwrite) as wr:
        for k, v in tensors_out.items():
            wr.write(k, v.contiguous())
    return {"output": str(outp), "arch": arch, "layers": len(report), "rank": rank,
            "inputs": [{"path": str(p), "weight": float(w)} for p, w in inputs],
            "size_after": outp.stat().st_size, "dropped_embeddings": dropped_embeddings,
            "min_energy": min(x["energy"] for x in report) if report else 1.0, "layer_report": report}


__all__ = ["merge_loras", "MERGED_FROM"]
