"""``lora inspect``: what a network file is (types, ranks, alphas, targets, base model, metadata)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

from ..files import open_model
from . import formats
from .network import group_modules, guess_lora_arch
from .names import resolve_name
from .detect import detect_naming, unmatched_modules

PathLike = Union[str, "os.PathLike[str]"]


def inspect_lora(path: PathLike) -> Dict[str, Any]:
    p = Path(path)
    with open_model(p) as r:
        keys = r.keys()
        meta = dict(r.metadata)
        arch = guess_lora_arch(keys, meta) or "SD1"
        groups, bundled = group_modules(keys, arch)
        naming = detect_naming(keys, arch)
        kinds: Dict[str, int] = {}
        ranks: Dict[str, int] = {}
        alphas: Dict[str, int] = {}
        targets = {"unet": 0, "text_encoder": 0, "text_encoder_2": 0}
        unmatched, unknown, conv, dora = [], [], 0, 0
        for mod, parts in groups.items():
            kind = formats.classify(set(parts)) if parts else None
            if kind is None:
                unknown.append(mod)
                continue
            kinds[kind] = kinds.get(kind, 0) + 1
            infos = {part: r.info(k) for part, k in parts.items()}
            if "dora_scale" in parts:
                dora += 1
            if kind == "lora":
                rk = str(infos["lora_down.weight"].shape[0])
                ranks[rk] = ranks.get(rk, 0) + 1
                if len(infos["lora_down.weight"].shape) == 4 and infos["lora_down.weight"].shape[2:] != (1, 1):
                    conv += 1
            if "alpha" in parts:
                a = f"{float(r.get(parts['alpha']).float().reshape(-1)[0]):g}"
                alphas[a] = alphas.get(a, 0) + 1
            t = resolve_name(mod, arch)
            if t is None:
                unmatched.append(mod)
            else:
                targets[t.component] = targets.get(t.component, 0) + 1
    return {
        "path": str(p), "format": r.format, "file_size": r.file_size, "tensors": len(keys),
        "base_model": arch, "types": kinds, "ranks": ranks, "alphas": alphas, "dora_layers": dora,
        "conv_kxk_layers": conv, "targets": {k: v for k, v in targets.items() if v},
        "unmatched": len(unmatched), "unmatched_examples": unmatched[:5], "unknown_modules": unknown[:5],
        "naming": naming, "unmatched_modules": unmatched_modules(keys, arch),
        "bundled_embeddings": sorted({k.split(".")[1] for k in bundled if k.count(".") >= 1}),
        "metadata": meta,
    }
