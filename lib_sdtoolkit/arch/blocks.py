"""Block vocabularies: the named conventions that say which block a key belongs to, per architecture.

Two conventions, one table each (architecture -> :class:`BlockConvention`), used by every caller:

``MBW`` - merge block weights (bbc-mc's merge-block-weighted, sd-meh and supermerger share it; sd-mecha differs by
sending ``time_embed`` to BASE). Applied to checkpoint keys:

* keys outside the UNet (text encoders, VAE, anything else) -> ``BASE``;
* ``time_embed`` (and SDXL ``label_emb``) -> ``IN00``;
* the final ``out.`` layers -> the last OUT block (``OUT11``; SDXL ``OUT08``);
* ``input_blocks.N`` -> ``INnn``, ``middle_block`` -> ``M00``, ``output_blocks.N`` -> ``OUTnn``;
* any other UNet key -> ``BASE``.

Block lists: SD1/SD2 and the SDXL refiner BASE, IN00-IN11, M00, OUT00-OUT11 (26); SDXL BASE, IN00-IN08, M00,
OUT00-OUT08 (20). A list of ratios has every block, with or without BASE (26/25, 20/19).

``LBW`` - LoRA block weights (the lora-block-weight extension's ``lbw=``). Applied to a LoRA layer's target module
(a checkpoint module name): ``input_blocks.N`` -> ``INnn``, ``middle_block`` -> ``M00``, ``output_blocks.N`` ->
``OUTnn``; everything else -> ``BASE``: the text encoders and the UNet layers outside the numbered blocks
(``time_embed``, ``label_emb``, ``out``). Lists (lora-block-weight's BLOCKID26/17/12/20, and the refiner's own):

* SD1/SD2: 26 = every block; 17 = the blocks with attention: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00,
  OUT03-OUT11;
* SDXL: 20 = every block; 12 = the blocks with attention: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05;
* SDXL refiner (12 input / 12 output blocks, attention at the two middle levels): 26 = every block; 12 = the blocks
  with attention: BASE, IN04, IN05, IN07, IN08, M00, OUT03-OUT08. (lora-block-weight itself knows no refiner: the
  WebUI calls a refiner ``is_sdxl`` and SDXL's lists leave IN09-IN11 / OUT09-OUT11 out.)

A short list names only its blocks; the others get 0, as lora-block-weight expands short lists.

``Flux.1`` (both conventions, the same blocks): BASE, D00-D18 (``double_blocks.N``), S00-S37 (``single_blocks.N``),
58 values, or 57 without BASE. For LBW also lora-block-weight's own 61 (its BLOCKIDFLUX): CLIP, T5, IN, D00-D18,
S00-S37, OUT, where CLIP (the CLIP-L text encoder), T5 (the T5 text encoder), IN (``img_in``, ``txt_in``,
``time_in``, ``vector_in``, ``guidance_in``) and OUT (``final_layer``) are the four ``parts`` of BASE: a LoRA layer's
LBW block is the part (:func:`lib_sdtoolkit.lora.fluxnames.block_of`), and a list that names BASE gives each part
BASE's value. BASE is everything outside the numbered blocks: ``img_in``, ``txt_in``, ``time_in``,
``vector_in``, ``guidance_in``, ``final_layer`` and, in an all-in-one file, the VAE and the text encoders
(ComfyUI's ModelMergeFlux1 lists the embedders and ``final_layer`` one by one; here they share BASE, as SD's
``time_embed``/``out`` share IN00/OUT11 with their neighbours). Every Flux layout is read: BFL bare keys
(``double_blocks.3.img_attn.qkv.weight``), the all-in-one ``model.diffusion_model.`` prefix (and bare
``diffusion_model.``), and diffusers' ``transformer_blocks.N`` / ``single_transformer_blocks.N`` (bare or under
``transformer.``), which are the same blocks in the same order. A key of a block the model cannot have
(``double_blocks.19``) is an error, as ``input_blocks.11`` is in SDXL.

Adding an architecture is one more row in each table: its block ids, the roots of its block-bearing keys and its
rules; nothing else changes. :func:`vocabulary` gives every architecture's block names (the UI's block editor and
plot read it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ArchitectureError
from .families import UNET_PREFIX, base_arch

MBW = "mbw"
LBW = "lbw"
CONVENTIONS = (MBW, LBW)


@dataclass(frozen=True)
class Rule:
    """``pattern`` is matched (``re.match``) against a key with its root removed; ``block`` is the block id, a
    ``str.format`` template given the pattern's first group as an int (``"IN{:02d}"``) or a fixed id."""

    pattern: "re.Pattern[str]"
    block: str

    def apply(self, rest: str) -> Optional[str]:
        m = self.pattern.match(rest)
        if m is None:
            return None
        return self.block.format(int(m.group(1))) if m.groups() else self.block


@dataclass(frozen=True)
class BlockConvention:
    """One convention for one architecture.

    ``blocks``: every block id, ``BASE`` first, in the order lists are written. ``roots``: key prefixes of the
    block-bearing model (a key under none of them is ``default``). ``rules``: tried in order on the key with its root
    removed; no match -> ``default``. ``lists``: number of values -> the block ids a list of that length names."""

    convention: str
    architecture: str
    blocks: Tuple[str, ...]
    roots: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    lists: Mapping[int, Tuple[str, ...]] = field(default_factory=dict)
    default: str = "BASE"
    #: a block that groups finer blocks some lists name one by one (Flux.1 LBW: BASE = CLIP, T5, IN, OUT)
    parts: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_known", frozenset(self.blocks))

    def block_of(self, key: str) -> str:
        """The block of ``key`` (a checkpoint key, or a module name for LBW). Raises ``ArchitectureError`` when the
        key names a block this architecture does not have (``input_blocks.11`` in an SDXL base model)."""
        for root in self.roots:
            if key.startswith(root):
                rest = key[len(root):]
                break
        else:
            return self.default
        for rule in self.rules:
            b = rule.apply(rest)
            if b is not None:
                if b not in self._known:
                    raise ArchitectureError(f"this key belongs to block {b}, which a {self.architecture} model does "
                                            f"not have ({describe(self.blocks)})", key=key)
                return b
        return self.default

    def ids_for(self, n: int) -> Optional[Tuple[str, ...]]:
        """The block ids a list of ``n`` values names, or None."""
        return self.lists.get(n)

    def list_lengths(self) -> List[int]:
        return sorted(self.lists, reverse=True)

    def describe_lengths(self) -> str:
        """``"26 (BASE, IN00..IN11, M00, OUT00..OUT11) or 25 (IN00..IN11, M00, OUT00..OUT11)"``, for messages."""
        return " or ".join(f"{n} ({describe(self.lists[n])})" for n in self.list_lengths())


def describe(ids: Sequence[str]) -> str:
    """Block ids with runs shortened: ``BASE, IN00..IN11, M00, OUT00..OUT11``."""
    parts: List[str] = []
    run: List[str] = []

    def split(b: str) -> Tuple[str, Optional[int]]:
        m = re.match(r"^(\D+)(\d+)$", b)
        return (m.group(1), int(m.group(2))) if m else (b, None)

    def flush() -> None:
        if run:
            parts.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
            run.clear()

    for b in ids:
        head, num = split(b)
        if run:
            h0, n0 = split(run[-1])
            if num is None or n0 is None or h0 != head or num != n0 + 1:
                flush()
        run.append(b)
    flush()
    return ", ".join(parts)


def _unet_ids(n_in: int, n_out: int) -> Tuple[str, ...]:
    return (tuple(f"IN{i:02d}" for i in range(n_in)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(n_out)))


def _ids(spec: str) -> Tuple[str, ...]:
    """``"BASE IN01 IN02 OUT03-OUT11"`` -> the ids (ranges expanded)."""
    out: List[str] = []
    for part in spec.split():
        if "-" in part:
            a, b = part.split("-")
            head = a.rstrip("0123456789")
            out += [f"{head}{i:02d}" for i in range(int(a[len(head):]), int(b[len(head):]) + 1)]
        else:
            out.append(part)
    return tuple(out)


_UNET_ROOTS = (UNET_PREFIX, "diffusion_model.")   # checkpoint keys; bare ``diffusion_model.`` (Forge/ComfyUI UNet)
_R_IN = Rule(re.compile(r"input_blocks\.(\d+)(?:\.|$)"), "IN{:02d}")
_R_MID = Rule(re.compile(r"middle_block(?:\.|$)"), "M00")
_R_OUT = Rule(re.compile(r"output_blocks\.(\d+)(?:\.|$)"), "OUT{:02d}")
_R_EMB = Rule(re.compile(r"(?:time_embed|label_emb)\."), "IN00")


def _mbw(arch: str, n: int) -> BlockConvention:
    blocks = ("BASE",) + _unet_ids(n, n)
    rules = (_R_EMB, Rule(re.compile(r"out\."), f"OUT{n - 1:02d}"), _R_IN, _R_MID, _R_OUT)
    return BlockConvention(MBW, arch, blocks, _UNET_ROOTS, rules, {len(blocks): blocks, len(blocks) - 1: blocks[1:]})


def _lbw(arch: str, n: int, attention: str) -> BlockConvention:
    blocks = ("BASE",) + _unet_ids(n, n)
    short = _ids(attention)
    return BlockConvention(LBW, arch, blocks, _UNET_ROOTS, (_R_IN, _R_MID, _R_OUT),
                           {len(blocks): blocks, len(short): short})


FLUX = "Flux.1"
FLUX_DOUBLE, FLUX_SINGLE = 19, 38
#: roots of Flux transformer keys, longest first: all-in-one, bare ComfyUI/Forge UNet-folder files, diffusers under
#: ``transformer.``, then bare keys (BFL ``flux1-dev.safetensors``, diffusers' own ``transformer/`` folder). With
#: the bare root every key is tried against the rules; VAE / text-encoder keys match none and stay BASE.
_FLUX_ROOTS = (UNET_PREFIX, "diffusion_model.", "transformer.", "")
_FLUX_RULES = (Rule(re.compile(r"double_blocks\.(\d+)(?:\.|$)"), "D{:02d}"),
               Rule(re.compile(r"single_blocks\.(\d+)(?:\.|$)"), "S{:02d}"),
               Rule(re.compile(r"transformer_blocks\.(\d+)(?:\.|$)"), "D{:02d}"),
               Rule(re.compile(r"single_transformer_blocks\.(\d+)(?:\.|$)"), "S{:02d}"))


#: the parts of Flux.1's LBW BASE, as lora-block-weight names them (its BLOCKIDFLUX)
FLUX_BASE_PARTS = ("CLIP", "T5", "IN", "OUT")


def _flux(name: str) -> BlockConvention:
    blocks = (("BASE",) + tuple(f"D{i:02d}" for i in range(FLUX_DOUBLE))
              + tuple(f"S{i:02d}" for i in range(FLUX_SINGLE)))
    lists = {len(blocks): blocks, len(blocks) - 1: blocks[1:]}
    if name != LBW:
        return BlockConvention(name, FLUX, blocks, _FLUX_ROOTS, _FLUX_RULES, lists)
    # lora-block-weight's own Flux list (61): CLIP, T5, IN, D00..D18, S00..S37, OUT
    lists[len(blocks) + 3] = ("CLIP", "T5", "IN") + blocks[1:] + ("OUT",)
    return BlockConvention(name, FLUX, blocks, _FLUX_ROOTS, _FLUX_RULES, lists, parts={"BASE": FLUX_BASE_PARTS})


#: convention -> base architecture -> its blocks and rules
TABLES: Dict[str, Dict[str, BlockConvention]] = {
    MBW: {
        "SD1": _mbw("SD1", 12),
        "SD2": _mbw("SD2", 12),
        "SDXL": _mbw("SDXL", 9),
        "SDXL-refiner": _mbw("SDXL-refiner", 12),
        FLUX: _flux(MBW),
    },
    LBW: {
        "SD1": _lbw("SD1", 12, "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11"),
        "SD2": _lbw("SD2", 12, "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11"),
        "SDXL": _lbw("SDXL", 9, "BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05"),
        "SDXL-refiner": _lbw("SDXL-refiner", 12, "BASE IN04 IN05 IN07 IN08 M00 OUT03-OUT08"),
        FLUX: _flux(LBW),
    },
}


def convention(name: str, arch: str) -> BlockConvention:
    """The ``name`` convention (:data:`MBW` or :data:`LBW`) for ``arch`` (a variant uses its base's). Raises
    ``ArchitectureError`` for an architecture without blocks in that convention."""
    try:
        table = TABLES[name]
    except KeyError:
        raise ValueError(f"unknown block convention {name!r}; known: {', '.join(TABLES)}") from None
    if arch in table:  # Flux.1 is no SD family (no row in families.FAMILIES): looked up by its own name
        return table[arch]
    try:
        return table[base_arch(arch)]
    except (ValueError, KeyError):
        what = "merge" if name == MBW else "LoRA"
        raise ArchitectureError(f"no {what} blocks for architecture {arch!r} (known: {', '.join(table)})") from None


def block_names(arch: str, name: str = MBW) -> List[str]:
    """Every block id of ``arch`` in the ``name`` convention, BASE first."""
    return list(convention(name, arch).blocks)


def block_of_key(key: str, arch: str, name: str = MBW) -> str:
    """The block of a checkpoint key (or, for :data:`LBW`, of a LoRA target module) in ``arch``."""
    return convention(name, arch).block_of(key)


def vocabulary(name: str = MBW) -> Dict[str, List[str]]:
    """``{architecture: [block ids, BASE first]}`` for every architecture with blocks in the ``name`` convention
    (SD1, SD2, SDXL, SDXL-refiner, Flux.1): what a block editor or plot shows for a model of each."""
    return {arch: list(conv.blocks) for arch, conv in TABLES[name].items()}


def stretch(values: Sequence[float], n: int) -> List[float]:
    """``values`` (a curve over evenly spaced slots) read at ``n`` evenly spaced points: the first and last points
    fall on the first and last slot, point ``j`` at slot position ``j * (len(values) - 1) / (n - 1)``, and a point
    between two slots takes the straight line between their values (piecewise-linear interpolation)."""
    m = len(values)
    if m == 0 or n <= 0:
        raise ValueError("stretch needs at least one value and one point")
    if n == 1 or m == 1:
        return [float(values[0])] * n
    out: List[float] = []
    for j in range(n):
        pos = j * (m - 1) / (n - 1)
        i = min(int(pos), m - 2)
        f = pos - i
        out.append(float(values[i]) * (1.0 - f) + float(values[i + 1]) * f)
    return out


def from_sd1_unet(values: Sequence[float], arch: str) -> List[float]:
    """An SD1 list of 25 UNet values (IN00..IN11, M00, OUT00..OUT11) for ``arch``'s MBW UNet blocks: each block takes
    the value of the SD1 block of the same name (SDXL: IN00..IN08, M00, OUT00..OUT08, i.e. supermerger's
    ``weighttoxl``; the refiner and SD2: all 25).

    Flux.1's blocks have other names: the 25 values are *stretched* over its 57 blocks in model order (D00..D18 then
    S00..S37) by :func:`stretch`: Flux block ``j`` (0..56) reads the SD curve at slot ``j * 24 / 56``, linearly
    between the two nearest slots. So D00 takes IN00, S37 takes OUT11, S09 (block 28, the middle) takes M00, and the
    input half of a preset covers the double blocks and the first 9 single blocks, the output half the rest;
    flat presets stay flat, a step between two slots becomes one intermediate value."""
    sd1 = convention(MBW, "SD1").blocks[1:]
    if len(values) != len(sd1):
        raise ValueError(f"an SD1 block list has {len(sd1)} UNet values, got {len(values)}")
    if arch == FLUX:
        return stretch(values, len(convention(MBW, FLUX).blocks) - 1)
    by_name = dict(zip(sd1, values))
    target = convention(MBW, arch).blocks[1:]
    missing = [b for b in target if b not in by_name]
    if missing:
        raise ArchitectureError(f"SD1 presets have no value for the {arch} blocks {', '.join(missing[:3])}")
    return [float(by_name[b]) for b in target]


__all__ = ["MBW", "LBW", "CONVENTIONS", "Rule", "BlockConvention", "TABLES", "convention", "block_names",
           "block_of_key", "from_sd1_unet", "describe", "vocabulary", "stretch", "FLUX", "FLUX_BASE_PARTS"]
