"""Checkpoint merge: recipes (pure data), presets, the method registry, the streaming engine, merge in memory.

>>> from lib_sdtoolkit.merge import MergeRecipe, merge_files
>>> report = merge_files(MergeRecipe("a.safetensors", "b.safetensors", alpha=0.3), "out.safetensors")

The names are loaded on first use (PEP 562), so importing a submodule that needs no tensors (``merge.methods``,
``merge.presets``, the CLI's argument declarations) does not import torch and the engine.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MergeRecipe": "recipe", "DTYPES": "recipe",
    "MergeReport": "engine", "MergeResult": "engine", "merge_files": "engine", "merge_in_memory": "engine",
    "save_current_merge": "engine", "build_metadata": "engine",
    "PRESETS": "presets", "get_preset": "presets", "parse_block_values": "presets", "preset_names": "presets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
