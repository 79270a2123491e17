"""lora-block-weight: per-block multipliers (12/17/20/26 values), presets, user presets, step ranges.

Lists (the lora-block-weight extension's block ids):

* 26 (SD1/SD2, every block): BASE, IN00-IN11, M00, OUT00-OUT11
* 17 (SD1/SD2, the blocks with attention): BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11
* 12 (SDXL, the blocks with attention): BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05
* 20 (SDXL, every block): BASE, IN00-IN08, M00, OUT00-OUT08

Blocks a list does not name get 0, as lora-block-weight expands short lists. BASE weighs the text encoders and the UNet
layers outside the numbered blocks (time_embed, out). Built-in presets are the extension's 17-value ones (SD1/SD2);
NONE, ALL and ALL0.5 work for every architecture. User presets: a text file of ``NAME:v1,v2,...`` lines
(``#`` comments allowed); a user preset overrides a built-in of the same name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ..errors import InvalidInputError
from .names import base_arch

PathLike = Union[str, "os.PathLike[str]"]

BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]

_LISTS_SD = {26: BLOCKID26, 17: BLOCKID17}
_LISTS_XL = {12: BLOCKID12, 20: BLOCKID20}


def _v(s: str) -> List[float]:
    return [float(x) for x in s.split(",")]


PRESETS: Dict[str, List[float]] = {
    "NONE": [0.0] * 17,
    "ALL": [1.0] * 17,
    "INS": _v("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _v("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _v("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _v("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _v("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _v("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _v("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": [0.5] * 17,
}
_UNIFORM = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}


def parse_presets_text(text: str, source: str = "presets") -> Dict[str, List[float]]:
    """``NAME:v1,v2,...`` lines -> {NAME: values}. Bad lines raise InvalidInputError naming the line."""
    out: Dict[str, List[float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            raise InvalidInputError(f"{source} line {n}: expected NAME:v1,v2,... got {line!r}")
        name, vals = line.split(":", 1)
        try:
            values = _v(vals)
        except ValueError:
            raise InvalidInputError(f"{source} line {n}: values must be numbers: {vals!r}") from None
        if len(values) not in (12, 17, 20, 26):
            raise InvalidInputError(f"{source} line {n}: {len(values)} values; expected 12, 17, 20 or 26")
        out[name.strip()] = values
    return out


def load_user_presets(path: Optional[PathLike]) -> Dict[str, List[float]]:
    """User presets from a text file; a missing file gives none."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        return {}
    return parse_presets_text(p.read_text(encoding="utf-8"), str(p))


def block_ids(arch: str) -> List[str]:
    return BLOCKID20 if base_arch(arch).startswith("SDXL") else BLOCKID26


def resolve_block_weights(spec: Optional[str], arch: str,
                          user_presets: Optional[Mapping[str, List[float]]] = None) -> Optional[Dict[str, float]]:
    """A preset name or a comma-separated list -> {block id: ratio} over every block of ``arch`` (None = no block
    weights). Raises InvalidInputError for an unknown preset or a list of the wrong length."""
    if spec is None or str(spec).strip() == "":
        return None
    s = str(spec).strip()
    xl = base_arch(arch).startswith("SDXL")
    presets = dict(PRESETS)
    presets.update(user_presets or {})
    if s in presets:
        values = presets[s]
        if xl and len(values) == 17 and s in _UNIFORM and s not in (user_presets or {}):
            values = [_UNIFORM[s]] * 12
    else:
        try:
            values = _v(s)
        except ValueError:
            known = ", ".join(sorted(presets))
            raise InvalidInputError(f"block weights {s!r}: unknown preset and not a list of numbers "
                                    f"(presets: {known})") from None
    lists = _LISTS_XL if xl else _LISTS_SD
    ids = lists.get(len(values))
    if ids is None:
        want = "12 or 20" if xl else "17 or 26"
        raise InvalidInputError(f"block weights {s!r}: {len(values)} values; a {base_arch(arch)} model takes {want}")
    out = {b: 0.0 for b in block_ids(arch)}
    out.update(dict(zip(ids, values)))
    return out


def active_at_step(step: int, start: Optional[int], stop: Optional[int]) -> bool:
    """``start=N`` / ``stop=N``: active for start <= step < stop (either bound optional)."""
    if start is not None and step < start:
        return False
    if stop is not None and step >= stop:
        return False
    return True


def block_key(weights: Optional[Mapping[str, float]]) -> Optional[Tuple[Tuple[str, float], ...]]:
    """Hashable form of block weights, for cache keys."""
    return None if weights is None else tuple(sorted(weights.items()))
