"""What naming a LoRA file is written in, and which of its modules match nothing (with the reason).

:func:`describe` is what ``lora inspect`` shows and what an explain tool can build on: it reads the header only
(no tensor data), groups the keys by module, resolves each module for the file's architecture and says why a module
would not be applied.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..files import open_model
from . import formats
from .convert import detect_naming
from .names import is_flux, resolve_name
from .network import group_modules, guess_lora_arch

PathLike = Union[str, "os.PathLike[str]"]


def unmatched_modules(keys: List[str], arch: str) -> List[Dict[str, str]]:
    """``[{"module", "reason"}]`` for every module of ``keys`` that a model of ``arch`` would not take."""
    groups, _ = group_modules(keys, arch)
    out = []
    for mod, parts in groups.items():
        if not parts:
            out.append({"module": mod, "reason": "not a network key this toolkit knows"})
            continue
        if formats.classify(set(parts)) is None:
            out.append({"module": mod, "reason": f"unsupported network type (parts {', '.join(sorted(parts))})"})
            continue
        if resolve_name(mod, arch) is None:
            if is_flux(arch) and ".processor.proj_lora" in mod and mod.split(".")[0] in ("single_blocks",
                                                                                        "diffusion_model"):
                why = "XLabs single-block proj_lora acts on the block's output, not on a weight of the checkpoint"
            else:
                why = f"no layer of a {arch} model has this name"
            out.append({"module": mod, "reason": why})
    return out


def describe(path: PathLike, arch: Optional[str] = None) -> Dict[str, Any]:
    """``{"arch", "naming", "modules", "unmatched": [{"module", "reason"}]}`` of a LoRA file (``arch`` guessed
    from the names and metadata unless given)."""
    with open_model(Path(path)) as r:
        keys = r.keys()
        meta = dict(r.metadata)
    a = arch or guess_lora_arch(keys, meta) or "SD1"
    groups, _ = group_modules(keys, a)
    return {"arch": a, "naming": detect_naming(keys, a), "modules": len(groups),
            "unmatched": unmatched_modules(keys, a)}


__all__ = ["describe", "unmatched_modules", "detect_naming"]
