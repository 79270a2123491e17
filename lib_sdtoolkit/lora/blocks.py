"""lora-block-weight: per-block multipliers, presets, user presets, step ranges.

The block ids, which lists of values an architecture takes (SD1/SD2 26 or 17, SDXL 20 or 12, SDXL refiner 26 or
12) and which block a layer belongs to are the ``LBW`` convention of :mod:`lib_sdtoolkit.arch.blocks`, one table for
every caller. Blocks a list does not name get 0, as lora-block-weight expands short lists. BASE weighs the text
encoders and the UNet layers outside the numbered blocks (time_embed, out).

Built-in presets are the extension's 17-value ones (SD1/SD2); NONE, ALL and ALL0.5 work for every architecture
(on the architecture's short list: the blocks with attention). User presets: a text file of ``NAME:v1,v2,...`` lines
(``#`` comments allowed); a user preset overrides a built-in of the same name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ..arch.blocks import LBW, TABLES, convention
from ..errors import InvalidInputError

PathLike = Union[str, "os.PathLike[str]"]

#: every list length some architecture takes (user preset files are read before the model is known)
_LENGTHS = sorted({n for c in TABLES[LBW].values() for n in c.lists})


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
        if len(values) not in _LENGTHS:
            want = ", ".join(str(x) for x in _LENGTHS[:-1]) + f" or {_LENGTHS[-1]}"
            raise InvalidInputError(f"{source} line {n}: {len(values)} values; expected {want}")
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


def resolve_block_weights(spec: Optional[str], arch: str,
                          user_presets: Optional[Mapping[str, List[float]]] = None) -> Optional[Dict[str, float]]:
    """A preset name or a comma-separated list -> {block id: ratio} over every block of ``arch`` (None = no block
    weights). Raises InvalidInputError for an unknown preset or a list of the wrong length."""
    if spec is None or str(spec).strip() == "":
        return None
    s = str(spec).strip()
    conv = convention(LBW, arch)
    presets = dict(PRESETS)
    presets.update(user_presets or {})
    if s in presets:
        values = presets[s]
        if s in _UNIFORM and s not in (user_presets or {}):
            # NONE / ALL / ALL0.5: one value on the architecture's short list (the blocks with attention)
            values = [_UNIFORM[s]] * min(conv.lists)
    else:
        try:
            values = _v(s)
        except ValueError:
            known = ", ".join(sorted(presets))
            raise InvalidInputError(f"block weights {s!r}: unknown preset and not a list of numbers "
                                    f"(presets: {known})") from None
    ids = conv.ids_for(len(values))
    if ids is None:
        want = " or ".join(str(n) for n in sorted(conv.lists))
        raise InvalidInputError(f"block weights {s!r}: {len(values)} values; a {conv.architecture} model takes "
                                f"{want} ({conv.describe_lengths()})")
    out = {b: 0.0 for b in conv.blocks}
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
