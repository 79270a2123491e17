"""Model files: lazy reading, streaming atomic writing, metadata (hashes live in ``files.hashes``), the folder
walker (``files.walk``).

The names below are loaded on first use (PEP 562): ``files.walk`` and ``files.regular`` stay importable without
torch, which the reader and the writer need."""
from __future__ import annotations

import importlib
from typing import Any

_READER = ("MODEL_SUFFIXES", "ST_DTYPES", "TORCH_TO_ST", "CkptReader", "ModelReader", "SafetensorsReader",
           "TensorInfo", "dtype_size", "load_state_dict", "open_model", "read_infos")
_WRITER = ("StreamingSafetensorsWriter", "atomic_path", "check_output_path", "save_ckpt", "save_safetensors",
           "save_state_dict", "sweep_stale_temps", "temp_name", "tensor_bytes_view")

__all__ = list(_READER + _WRITER)


def __getattr__(name: str) -> Any:
    if name in _READER:
        return getattr(importlib.import_module(".reader", __name__), name)
    if name in _WRITER:
        return getattr(importlib.import_module(".writer", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
