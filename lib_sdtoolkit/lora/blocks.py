"""lora-block-weight: per-block multipliers, presets, user presets, step ranges.

The block ids, which lists of values an architecture takes (SD1/SD2 26 or 17, SDXL 20 or 12, SDXL refiner 26 or
12) and which block a layer belongs to are the ``LBW`` convention of :mod:`lib_sdtoolkit.arch.blocks`, one table for
every caller. Blocks a list does not name get 0, as lora-block-weight expands short lists. BASE weighs the text
encoders and the UNet layers outside the numbered blocks (time_embed, out).

Built-in presets are the extension's 17-value ones (SD1/SD2); NONE, ALL and ALL0.5 work for every architecture
(on the architecture's short list: the blocks with attention). :func:`preset_for` carries a preset of another
architecture over by block name (for the block-weight editor, which says so); :func:`lbw_list` writes weights back
as the shortest list that parses to them. User presets: a text file of ``NAME:v1,v2,...`` lines
(``#`` comments allowed); a user preset overrides a built-in of the same name.
"""
from __future__ import annotations

import os
from pathlib import Path
import math
from typing import Dict, List, Mapping, Optional, Tuple, Union

from ..arch.blocks import LBW, TABLES, convention, describe
from ..errors import InvalidInputError

PathLike = Union[str, "os.PathLike[str]"]

#: every list length some architecture takes (user preset files are read before the model is known)
_LENGTHS = sorted({n for c in TABLES[LBW].values() for n in c.lists})
#: finer block -> the block that groups it (Flux.1: CLIP, T5, IN, OUT -> BASE)
_GROUP = {part: group for c in TABLES[LBW].values() for group, parts in c.parts.items() for part in parts}


def block_weight(weights: Mapping[str, float], block: str) -> float:
    """The weight of a layer of ``block`` under resolved block weights: the block's own, else (a part of a grouping
    block: Flux.1's CLIP, T5, IN, OUT under a list that names BASE) the group's, else 0."""
    if block in weights:
        return float(weights[block])
    group = _GROUP.get(block)
    return float(weights.get(group, 0.0)) if group is not None else 0.0


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
    "FLUXALL": [1.0] * 61,   # lora-block-weight's one Flux preset (its 61-value list)
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
            # NONE / ALL / ALL0.5: one value on the architecture's short list (the blocks with attention) that has
            # BASE (Flux.1's 57 leave BASE out: ALL there is every block, like lora-block-weight's FLUXALL)
            values = [_UNIFORM[s]] * min(n for n, ids in conv.lists.items() if "BASE" in ids)
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
    # a list that names the parts of a group (lora-block-weight's Flux 61: CLIP, T5, IN, ..., OUT) is keyed by its
    # own ids; the others by the architecture's blocks (see block_weight)
    out = {b: 0.0 for b in (conv.blocks if set(ids) <= set(conv.blocks) else ids)}
    out.update(dict(zip(ids, values)))
    return out


def active_at_step(step: int, start: Optional[int], stop: Optional[int]) -> bool:
    """``start=N`` / ``stop=N``: active for start <= step < stop (either bound optional)."""
    if start is not None and step < start:
        return False
    if stop is not None and step >= stop:
        return False
    return True


def fmt_weight(v: float) -> str:
    """A block weight as lbw lists write it: rounded to 3 decimals, no trailing zeros, never ``-0`` or an exponent
    (0.199031 -> ``0.199``, 1.0 -> ``1``)."""
    s = f"{round(float(v), 3):.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def lbw_list(weights: Mapping[str, float], arch: str) -> str:
    """The ``lbw=`` list of ``weights`` ({block id: weight}; blocks left out are 0) for a LoRA on ``arch``, each value
    rounded to 3 decimals: the architecture's short list (lora-block-weight's 17 for SD1/SD2, 12 for SDXL, 57 for
    Flux.1 without BASE) when every block it leaves out is 0, else the list of every block; on Flux.1, when CLIP,
    T5, IN and OUT (the parts of BASE, given one by one) differ, lora-block-weight's 61. Parsed back with
    :func:`resolve_block_weights` it gives the same weights (rounded). Raises InvalidInputError for a block id the
    architecture does not have or a weight that is not a finite number."""
    conv = convention(LBW, arch)
    part_of = {p: g for g, parts in conv.parts.items() for p in parts}
    unknown = [b for b in weights if b not in conv.blocks and b not in part_of]
    if unknown:
        raise InvalidInputError(f"block weights: {', '.join(unknown[:4])} not a {conv.architecture} block "
                                f"({describe(conv.blocks)})")
    vals: Dict[str, float] = {}
    for b in list(conv.blocks) + list(part_of):
        v = float(weights.get(b, weights.get(part_of.get(b, ""), 0.0)))
        if not math.isfinite(v):
            raise InvalidInputError(f"block weights: {b} = {v} is not a finite number")
        vals[b] = round(v, 3)
    split = [g for g, parts in conv.parts.items() if len({vals[p] for p in parts}) > 1]
    if split:  # the parts of a group differ: only the list that names each part says it (Flux.1: 61)
        ids = next(ids for n, ids in sorted(conv.lists.items()) if all(p in ids for g in split for p in conv.parts[g]))
        return ",".join(fmt_weight(vals[b]) for b in ids)
    for g, parts in conv.parts.items():  # equal parts: the group's value
        vals[g] = vals[parts[0]]
    for n in sorted(conv.lists):
        ids = conv.lists[n]
        if any(b not in conv.blocks for b in ids):
            continue  # a list of parts (Flux.1's 61) only when they differ (above)
        if all(vals[b] == 0 for b in conv.blocks if b not in ids):
            return ",".join(fmt_weight(vals[b]) for b in ids)
    raise AssertionError("the full list names every block")  # conv.lists always holds the full list


def preset_lists(name: str, user_presets: Optional[Mapping[str, List[float]]] = None) -> Optional[List[float]]:
    """The values of a built-in or user preset as written (user presets win), or None."""
    if user_presets and name in user_presets:
        return list(user_presets[name])
    return list(PRESETS[name]) if name in PRESETS else None


def preset_for(name: str, arch: str, user_presets: Optional[Mapping[str, List[float]]] = None
               ) -> Tuple[Dict[str, float], Optional[str]]:
    """(weights over every block of ``arch``, note) for preset ``name``.

    A preset whose length ``arch`` takes is resolved as a tag would be (note None). A preset written for another
    architecture (the built-in 17-value presets on SDXL or Flux.1) is refused by lora-block-weight and by
    :func:`resolve_block_weights` (``lbw=MIDD`` on an SDXL LoRA); here its values are carried over by block name
    (blocks of the same id; the others 0) and the note says so and which blocks were dropped, so the editor can
    offer the explicit list instead of the name."""
    values = preset_lists(name, user_presets)
    if values is None:
        known = ", ".join(sorted(set(PRESETS) | set(user_presets or {})))
        raise InvalidInputError(f"unknown block-weight preset {name!r} (presets: {known})")
    conv = convention(LBW, arch)
    if conv.ids_for(len(values)) is not None or (name in _UNIFORM and name not in (user_presets or {})):
        return resolve_block_weights(name, arch, user_presets) or {}, None
    src = next((c for c in TABLES[LBW].values() if c.ids_for(len(values)) is not None), None)
    if src is None:  # cannot happen for a parsed preset: its length is one some architecture takes
        raise InvalidInputError(f"preset {name!r}: {len(values)} values fit no architecture")
    ids = src.ids_for(len(values))
    by_name = dict(zip(ids, values))
    out = {b: float(by_name.get(b, 0.0)) for b in conv.blocks}
    dropped = [b for b in ids if b not in conv.blocks and by_name[b] != 0]
    same = [b for b in ids if b in conv.blocks]
    archs = "/".join(a for a, c in TABLES[LBW].items() if c.ids_for(len(values)) == ids)
    note = (f"{name} is a {len(values)}-value {archs} preset; a {conv.architecture} LoRA takes "
            f"{' or '.join(str(n) for n in sorted(conv.lists))} values, so lbw={name} would be refused for it. "
            f"Its values are carried over by block name ({describe(same) if same else 'no block in common'})")
    note += f"; dropped: {describe(dropped)} (no such {conv.architecture} block)." if dropped else "."
    return out, note


def block_key(weights: Optional[Mapping[str, float]]) -> Optional[Tuple[Tuple[str, float], ...]]:
    """Hashable form of block weights, for cache keys."""
    return None if weights is None else tuple(sorted(weights.items()))
