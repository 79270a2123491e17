"""The tiny sample checkpoints' key layouts (SD1, SDXL), shipped as data so that the sample library is written
without importing transformers / diffusers (which takes most of a first start on a loaded machine).

``tiny_layouts.json.gz`` holds ``{arch: [[key, [shape...], dtype], ...]}`` in the order of
:func:`lib_sdtoolkit.samples.factory.key_specs` (the real ldm / diffusers / transformers modules on the ``meta``
device). Regenerate with ``python -m lib_sdtoolkit.samples.tiny_layouts``; a test compares the shipped data with the
modules.
"""
from __future__ import annotations

import functools
import gzip
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

DATA = Path(__file__).resolve().parent / "tiny_layouts.json.gz"
ARCHS = ("SD1", "SDXL")


def generate() -> Dict[str, List[list]]:
    """The layouts computed from the real modules (slow: imports transformers and diffusers)."""
    from . import factory

    return {a: [[s.name, list(s.shape), str(s.dtype).replace("torch.", "")] for s in factory.key_specs(a, "tiny")]
            for a in ARCHS}


def data_bytes(data: Dict[str, List[list]]) -> bytes:
    return gzip.compress(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8"), mtime=0)


@functools.lru_cache(maxsize=None)
def _load() -> Dict[str, Tuple[Tuple[str, Tuple[int, ...], str], ...]]:
    raw = json.loads(gzip.decompress(DATA.read_bytes()).decode("utf-8"))
    return {a: tuple((k, tuple(s), d) for k, s, d in v) for a, v in raw.items()}


def tiny_layout(arch: str) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``[(key, shape, dtype name)]`` of a tiny ``arch`` checkpoint in module order."""
    return list(_load()[arch])


if __name__ == "__main__":
    DATA.write_bytes(data_bytes(generate()))
    print(f"wrote {DATA}", file=sys.stderr)
