"""Merge-block-weighted presets and block-ratio parsing.

A preset is the 25 UNet ratios of an SD1/SD2 merge (IN00..IN11, M00, OUT00..OUT11) plus the BASE ratio that
bbc-mc's MBW and supermerger list first (0 for every preset but ``ALL_B``). The names and values are those of
bbc-mc's ``csv/preset.tsv`` and supermerger's ``mbwpresets`` (see REFERENCE/merge-anchors.md); they are generated
here from their defining formulas (x = i/24 for slot i, ``smoothstep(x) = 3x^2 - 2x^3``), except the
``TRUE_CUBIC_HERMITE`` pair which has no closed form in those projects and is listed as data.
``FAKE_REVERSE_CUBIC_HERMITE`` is ``1 - FAKE_CUBIC_HERMITE`` in every slot (supermerger's table has OUT10 copied
from the TRUE curve, 0.157365 instead of 0.157576; we keep the curve's value).

The blocks of each architecture are the ``MBW`` convention of :mod:`lib_sdtoolkit.arch.blocks` (SD1/SD2 and the
SDXL refiner 25 UNet blocks, SDXL 19). A preset is given for another architecture block by block name
(:func:`~lib_sdtoolkit.arch.blocks.from_sd1_unet`): SDXL keeps IN00..IN08, M00 and OUT00..OUT08 (slots 0-8 and 12-21
of the 25) and drops IN09-11 / OUT09-11, the way supermerger does; the refiner takes all 25.

Flux.1 (BASE, D00-D18, S00-S37: 58 values, 57 without BASE) has no block of an SD name, so a preset is *stretched*
over its 57 blocks in model order: Flux block ``j`` (D00 = 0 .. D18 = 18, S00 = 19 .. S37 = 56) takes the preset's
curve at slot ``j * 24 / 56``, linearly between the two nearest slots (IN00 -> D00, M00 -> S09, OUT11 -> S37). The
preset's BASE is BASE. Flat presets stay flat; a 0/1 step between two slots gets one intermediate value.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..arch.blocks import MBW, convention, describe, from_sd1_unet
from ..errors import InvalidInputError

#: the presets' own slots: SD1's UNet blocks IN00..IN11, M00, OUT00..OUT11
N_SD = 25


def _x() -> List[float]:
    return [i / 24 for i in range(N_SD)]


def _smooth(x: float) -> float:
    return 3 * x * x - 2 * x ** 3


def _fold(y: float) -> float:
    """Fold ``y >= 0`` into [0, 1] as a triangle wave (1.2 -> 0.8, 2.1 -> 0.1)."""
    y = math.fmod(y, 2.0)
    return 2.0 - y if y > 1.0 else y


def _curve(fn) -> List[float]:
    return [fn(x) for x in _x()]


_TRUE_CUBIC_HERMITE = [
    0.0, 0.199031876929012, 0.325761959876543, 0.424641927083333, 0.498456790123457, 0.549991560570988,
    0.58203125, 0.597360869984568, 0.598765432098765, 0.589029947916667, 0.570939429012346, 0.547278886959876,
    0.520833333333333, 0.49438777970679, 0.470727237654321, 0.45263671875, 0.442901234567901, 0.444305796682099,
    0.459635416666667, 0.491675106095678, 0.543209876543211, 0.617024739583333, 0.715904706790124,
    0.842634789737655, 1.0]


def _flat(v: float) -> List[float]:
    return [v] * N_SD


def _ones(idx: Sequence[int]) -> List[float]:
    out = [0.0] * N_SD
    for i in idx:
        out[i] = 1.0
    return out


def _wrap(n: int) -> List[float]:
    h = n // 2
    return _ones(list(range(h)) + list(range(N_SD - h, N_SD)))


def _build() -> Dict[str, Tuple[float, List[float]]]:
    p: Dict[str, Tuple[float, List[float]]] = {}
    grad_v = [abs(i - 12) / 12 for i in range(N_SD)]
    p["GRAD_V"] = (0.0, grad_v)
    p["GRAD_A"] = (0.0, [1 - v for v in grad_v])
    p["FLAT_25"] = (0.0, _flat(0.25))
    p["FLAT_75"] = (0.0, _flat(0.75))
    for n in (8, 12, 14, 16):
        p[f"WRAP{n:02d}"] = (0.0, _wrap(n))
    p["MID12_50"] = (0.0, [0.5 if 5 <= i <= 18 else 0.0 for i in range(N_SD)])
    p["OUT07"] = (0.0, _ones(range(18, 25)))
    p["OUT12"] = (0.0, _ones(range(13, 25)))
    out12_5 = _ones(range(13, 25))
    out12_5[12] = 0.5
    p["OUT12_5"] = (0.0, out12_5)
    ring_soft = [0.0] * N_SD
    for i in (6, 7, 8, 16, 17, 18):
        ring_soft[i] = 1.0
    for i in (5, 9, 15, 19):
        ring_soft[i] = 0.5
    p["RING08_SOFT"] = (0.0, ring_soft)
    p["RING08_5"] = (0.0, _ones([6, 7, 8, 9, 15, 16, 17, 18]))
    p["RING10_5"] = (0.0, _ones([5, 6, 7, 8, 9, 15, 16, 17, 18, 19]))
    p["RING10_3"] = (0.0, _ones([6, 7, 8, 9, 10, 14, 15, 16, 17, 18]))
    p["SMOOTHSTEP"] = (0.0, _curve(_smooth))
    p["REVERSE_SMOOTHSTEP"] = (0.0, _curve(lambda x: 1 - _smooth(x)))
    for n in (2, 3, 4):
        p[f"SMOOTHSTEP*{n}"] = (0.0, _curve(lambda x, n=n: _fold(n * _smooth(x))))
        p[f"R_SMOOTHSTEP*{n}"] = (0.0, _curve(lambda x, n=n: 1 - _fold(n * _smooth(x))))
        p[f"SMOOTHSTEP/{n}"] = (0.0, _curve(lambda x, n=n: _smooth(_fold(n * x))))
        p[f"R_SMOOTHSTEP/{n}"] = (0.0, _curve(lambda x, n=n: 1 - _smooth(_fold(n * x))))
    p["COSINE"] = (0.0, _curve(lambda x: (1 + math.cos(math.pi * x)) / 2))
    p["REVERSE_COSINE"] = (0.0, _curve(lambda x: (1 - math.cos(math.pi * x)) / 2))
    p["TRUE_CUBIC_HERMITE"] = (0.0, list(_TRUE_CUBIC_HERMITE))
    p["TRUE_REVERSE_CUBIC_HERMITE"] = (0.0, [1 - v for v in _TRUE_CUBIC_HERMITE])
    fake = _curve(lambda x: (19 / 3) * x ** 3 - 9.5 * x * x + (25 / 6) * x)
    p["FAKE_CUBIC_HERMITE"] = (0.0, fake)
    p["FAKE_REVERSE_CUBIC_HERMITE"] = (0.0, [1 - v for v in fake])
    p["ALL_A"] = (0.0, _flat(0.0))
    p["ALL_B"] = (1.0, _flat(1.0))
    return p


#: name -> (BASE ratio, 25 UNet ratios)
PRESETS: Dict[str, Tuple[float, List[float]]] = _build()
#: other spellings accepted (supermerger writes REVERSE-SMOOTHSTEP)
ALIASES = {"REVERSE-SMOOTHSTEP": "REVERSE_SMOOTHSTEP"}


def preset_names() -> List[str]:
    return list(PRESETS)


def get_preset(name: str, family: str = "SD1") -> Tuple[float, List[float]]:
    """``(BASE, UNet ratios)`` of a named preset for ``family``, one ratio per UNet block of its ``MBW`` convention
    (SD1/SD2/SDXL-refiner: 25, SDXL: 19, Flux.1: 57 stretched, see the module docstring)."""
    key = ALIASES.get(name.strip(), name.strip()) if name else name
    found = PRESETS.get(key) or PRESETS.get(key.upper()) if key else None
    if found is None:
        raise InvalidInputError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    base, unet = found
    return base, from_sd1_unet(unet, family)


def unet_block_count(family: str) -> int:
    """UNet blocks of ``family`` (every MBW block but BASE)."""
    return len(convention(MBW, family).blocks) - 1


def parse_block_values(blocks: Union[str, Sequence[float]], family: str) -> Tuple[Optional[float], List[float]]:
    """Parse a block list for ``family``: one value per MBW block, with or without BASE first (SD1/SD2/SDXL-refiner
    26 or 25, SDXL 20 or 19, Flux.1 58 or 57).

    Returns ``(BASE or None, UNet ratios)``. Raises ``InvalidInputError`` naming the expected counts."""
    if isinstance(blocks, str):
        parts = [p.strip() for p in blocks.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InvalidInputError(f"block ratios must be numbers separated by commas, got {blocks!r}") from None
    else:
        values = [float(v) for v in blocks]
    if any(not math.isfinite(v) for v in values):
        raise InvalidInputError("block ratios must be finite numbers")
    conv = convention(MBW, family)
    ids = conv.ids_for(len(values))
    if ids is None:
        n = len(conv.blocks) - 1
        raise InvalidInputError(f"wrong number of block values for {family}: got {len(values)}, expected {n} "
                                f"({describe(conv.blocks[1:])}) or {n + 1} (BASE first)")
    by_id = dict(zip(ids, values))
    return by_id.get("BASE"), [by_id[b] for b in conv.blocks[1:]]


__all__ = ["PRESETS", "ALIASES", "preset_names", "get_preset", "parse_block_values", "unet_block_count", "N_SD"]
