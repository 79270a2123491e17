"""Checkpoint merge: recipes (pure data), presets, the streaming engine, merge in memory.

>>> from lib_sdtoolkit.merge import MergeRecipe, merge_files
>>> report = merge_files(MergeRecipe("a.safetensors", "b.safetensors", alpha=0.3), "out.safetensors")
"""
from .engine import MergeReport, MergeResult, build_metadata, merge_files, merge_in_memory, save_current_merge
from .presets import PRESETS, get_preset, parse_block_values, preset_names
from .recipe import DTYPES, MergeRecipe

__all__ = ["MergeRecipe", "DTYPES", "MergeReport", "MergeResult", "merge_files", "merge_in_memory",
           "save_current_merge", "build_metadata", "PRESETS", "get_preset", "parse_block_values", "preset_names"]
