"""``lora convert IN --to kohya|diffusers|peft|comfy -o OUT``: the same network under another naming, exactly.

The input's naming is detected from its keys (:func:`detect_naming`); every module is resolved to its checkpoint
target (SD1/SD2/SDXL through :mod:`.names`, Flux.1 through :mod:`.fluxnames`) and written under the target's name in
the output naming. Tensors are copied as stored (same dtype, same bits): a round trip A -> B -> A gives A's tensors
back bit for bit. Namings:

* ``kohya``: ``lora_unet_...`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + ``.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (LyCORIS parts keep their own names);
* ``diffusers``: ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` + diffusers module paths +
  ``.lora_A.weight`` / ``.lora_B.weight`` (+ ``.alpha`` where the input has one, as diffusers' loaders read it);
* ``peft``: the diffusers names under PEFT's ``base_model.model.``;
* ``comfy``: ``diffusion_model.`` + the checkpoint's own module names (ldm/sgm for SD, BFL for Flux) and
  ``text_encoders.clip_l.transformer.`` ... for the text encoders, with kohya's part names (what ComfyUI writes).

Flux's fused weights: a LoRA on a whole ``qkv`` / ``linear1`` is written in diffusers naming as one module per
piece (``to_q``, ``to_k``, ``to_v``, ``proj_mlp``) sharing the down matrix and splitting the up rows; pieces read
back into one fused module by stacking the ups block-diagonally (or, when all pieces share one down matrix, by
stacking the ups under that down), and a block-diagonal up is split back into its blocks: both directions are
exact, and kohya -> diffusers -> kohya and diffusers -> kohya -> diffusers give the input back bit for bit.
The final modulation (BFL shift|scale, diffusers ``norm_out`` scale|shift) has its up rows swapped.
Only LoRA/LoCon modules are split or fused; a LoHa/LoKr/DoRA module on a fused Flux weight has no exact form in the
other naming and is refused with its name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..arch import fluxmaps, keymaps
from ..arch.families import FAMILIES, base_arch
from ..errors import InvalidInputError
from ..files import StreamingSafetensorsWriter, check_output_path, open_model
from . import fluxnames
from .names import comfy_te_names, is_flux, resolve_name
from .network import group_modules, guess_lora_arch

PathLike = Union[str, "os.PathLike[str]"]
NAMINGS = ("kohya", "diffusers", "peft", "comfy")
_UP, _DOWN = "lora_up.weight", "lora_down.weight"
_DIFFUSERS_PARTS = {_UP: "lora_B.weight", _DOWN: "lora_A.weight"}
_PEFT = "base_model.model."


@dataclass
class Module:
    """One network module: its target and its tensors (part name as :mod:`.formats` knows it -> tensor)."""

    target: keymaps.LoraTarget
    parts: Dict[str, torch.Tensor]
    source: str = ""

    @property
    def is_lora(self) -> bool:
        return set(self.parts) - {"alpha"} == {_UP, _DOWN}


# ---------------------------------------------------------------------------------------------- detection
def detect_naming(keys: List[str], arch: str) -> str:
    """The naming of a LoRA file's keys: ``kohya``, ``diffusers``, ``peft``, ``comfy``, ``xlabs``, ``bfl``,
    ``simpletuner`` (the most common among its modules), or ``unknown``."""
    counts: Dict[str, int] = {}
    for k in keys:
        if is_flux(arch):
            s = fluxnames.split_key(k)
            name = fluxnames.naming(s[0]) if s else "unknown"
        elif k.startswith(("lora_unet_", "lora_te")):
            name = "kohya"
        elif k.startswith(_PEFT):
            name = "peft"
        elif k.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            name = "diffusers"
        elif k.startswith(("diffusion_model.", "text_encoders.")):
            name = "comfy"
        else:
            name = "unknown"
        counts[name] = counts.get(name, 0) + 1
    if not counts:
        return "unknown"
    known = {k: v for k, v in counts.items() if k != "unknown"}
    return max(known or counts, key=lambda n: (known or counts)[n])


# ------------------------------------------------------------------------------------------------ SD names
def _te_hf_paths(arch: str) -> Dict[Tuple[str, Optional[int]], Tuple[str, str]]:
    """(checkpoint module, qkv index) -> (component, HF CLIP module path) for the text encoders of ``arch``."""
    base = base_arch(arch)
    layout = keymaps.load_layout(base)
    out = {}
    for comp, prefix, fmt in keymaps.TEXT_PREFIXES.get(base, []):
        for hf, ldm, idx in keymaps._hf_text_modules(layout, prefix, fmt):
            out[(ldm, idx)] = (comp, hf)
    return out


def _sd_name(t: keymaps.LoraTarget, naming: str, arch: str, te_paths) -> str:
    if naming == "kohya":
        return keymaps.kohya_name_of_module(t.module + ("#" + "qkv"[t.qkv_index] if t.qkv_index is not None else ""),
                                            arch)
    if t.component == "unet":
        local = t.module[len(keymaps.UNET_PREFIX):]
        if naming == "comfy":
            return "diffusion_model." + local
        name = "unet." + keymaps.unet_ldm_key_to_diffusers(local, base_arch(arch))
        return (_PEFT + name) if naming == "peft" else name
    comp, hf = te_paths[(t.module, t.qkv_index)]
    if naming == "comfy":
        kohya = FAMILIES[base_arch(arch)].text_encoder(comp).kohya
        return f"text_encoders.{comfy_te_names(arch)[kohya]}.transformer.{hf}"
    name = f"{comp}.{hf}"
    return (_PEFT + name) if naming == "peft" else name


# ---------------------------------------------------------------------------------------------- Flux names
_FLUX_TE = {"text_encoder": ("lora_te1_", "text_encoders.clip_l.transformer.", "text_encoder."),
            "text_encoder_2": ("lora_te2_", "text_encoders.t5xxl.transformer.", "text_encoder_2.")}


def _flux_name(module: str, component: str, naming: str) -> str:
    """The name of a Flux module (BFL path for kohya/comfy, diffusers path for diffusers/peft; the text encoders'
    own paths) in ``naming``."""
    if component != "transformer":
        kohya, comfy, diff = _FLUX_TE[component]
        if naming == "kohya":
            return kohya + module.replace(".", "_")
        if naming == "comfy":
            return comfy + module
        return (_PEFT if naming == "peft" else "") + diff + module
    if naming == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    if naming == "comfy":
        return "diffusion_model." + module
    return (_PEFT if naming == "peft" else "") + "transformer." + module


def _refuse_split(m: Module, why: str) -> InvalidInputError:
    return InvalidInputError(f"{m.source}: {why}; it has no exact form in the other naming (convert to a naming "
                             f"with the same module layout instead)")


def _alpha_like(a: torch.Tensor, value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64).to(a.dtype).reshape(a.shape)


def _split(m: Module, pieces: List[Tuple[str, Tuple[int, int]]], a: int) -> List[Tuple[str, Dict[str, torch.Tensor]]]:
    """Split a LoRA module on BFL rows starting at unit ``a`` over ``pieces`` [(diffusers module, (unit, units))]
    (rows already clipped to the module's range). A block-diagonal up (one rank block per piece, as a fused
    diffusers file gives) is split into its blocks; otherwise the down matrix is shared."""
    if not m.is_lora:
        raise _refuse_split(m, f"a {'/'.join(sorted(m.parts))} module on a fused weight")
    up, down = m.parts[_UP], m.parts[_DOWN]
    h = down.shape[1] if down.dim() == 2 else down.reshape(down.shape[0], -1).shape[1]
    r = down.shape[0]
    n = len(pieces)
    rows = [((b - a) * h, (b - a + k) * h) for _, (b, k) in pieces]
    sparse = n > 1 and r % n == 0
    if sparse:
        rb = r // n
        for j, (lo, hi) in enumerate(rows):
            blk = up[lo:hi].clone()
            blk[:, j * rb:(j + 1) * rb] = 0
            if bool(blk.any()):
                sparse = False
                break
    out = []
    alpha = m.parts.get("alpha")
    for j, ((d, _), (lo, hi)) in enumerate(zip(pieces, rows)):
        if n > 1 and not bool(up[lo:hi].any()):
            continue  # a piece the fused module leaves alone (a file that trained to_q only): no module for it
        if sparse:
            parts = {_UP: up[lo:hi, j * (r // n):(j + 1) * (r // n)].contiguous(),
                     _DOWN: down[j * (r // n):(j + 1) * (r // n)].contiguous()}
            if alpha is not None:
                parts["alpha"] = _alpha_like(alpha, float(alpha.double()) / n)
        else:
            parts = {_UP: up[lo:hi].contiguous(), _DOWN: down.clone()}
            if alpha is not None:
                parts["alpha"] = alpha.clone()
        out.append((d, parts))
    return out


def _fuse(mods: List[Module], n_units: int) -> Dict[str, torch.Tensor]:
    """One LoRA module on a whole fused BFL weight from modules on row ranges of it (``target.rows``)."""
    for m in mods:
        if not m.is_lora:
            raise _refuse_split(m, f"a {'/'.join(sorted(m.parts))} module on a piece of a fused weight")
    downs = [m.parts[_DOWN] for m in mods]
    h = downs[0].shape[1]
    alphas = [m.parts.get("alpha") for m in mods]
    ranks = [d.shape[0] for d in downs]
    scales = [(float(a.double()) if a is not None else float(r)) / r for a, r in zip(alphas, ranks)]
    up0 = mods[0].parts[_UP]
    shared = all(torch.equal(d, downs[0]) and d.dtype == downs[0].dtype for d in downs) and \
        all((a is None) == (alphas[0] is None) and (a is None or torch.equal(a, alphas[0])) for a in alphas)
    if shared:
        up = torch.zeros(n_units * h, ranks[0], dtype=up0.dtype)
        for m in mods:
            lo = m.target.rows[0] * h
            up[lo:lo + m.parts[_UP].shape[0]] = m.parts[_UP]
        out = {_UP: up, _DOWN: downs[0].clone()}
        if alphas[0] is not None:
            out["alpha"] = alphas[0].clone()
        return out
    if len(set(scales)) != 1:
        raise InvalidInputError(f"{mods[0].source}: the pieces of one fused weight have different alpha/rank "
                                f"({', '.join(f'{s:g}' for s in scales)}); one fused module cannot hold them exactly")
    total = sum(ranks)
    up = torch.zeros(n_units * h, total, dtype=up0.dtype)
    col = 0
    for m, r in zip(mods, ranks):
        lo = m.target.rows[0] * h
        up[lo:lo + m.parts[_UP].shape[0], col:col + r] = m.parts[_UP]
        col += r
    out = {_UP: up, _DOWN: torch.cat(downs, 0)}
    if alphas[0] is not None:
        out["alpha"] = _alpha_like(alphas[0], float(alphas[0].double()) * total / ranks[0])
    return out


def _swap(m: Module) -> Dict[str, torch.Tensor]:
    """The module with the halves of its output rows swapped (BFL final modulation <-> diffusers norm_out)."""
    if m.is_lora:
        up = m.parts[_UP]
        n = up.shape[0] // 2
        return {**m.parts, _UP: torch.cat([up[n:], up[:n]], 0)}
    if set(m.parts) <= {"diff", "diff_b"}:
        out = {}
        for k, v in m.parts.items():
            n = v.shape[0] // 2
            out[k] = torch.cat([v[n:], v[:n]], 0)
        return out
    raise _refuse_split(m, "a non-LoRA module on the final modulation, whose rows diffusers orders differently")


def _flux_out(mods: List[Module], naming: str) -> List[Tuple[str, Dict[str, torch.Tensor]]]:
    out: List[Tuple[str, Dict[str, torch.Tensor]]] = []
    bfl_names = naming in ("kohya", "comfy")
    by_module: Dict[str, List[Module]] = {}
    for m in mods:
        if m.target.component != "transformer":
            out.append((_flux_name(m.target.module, m.target.component, naming), dict(m.parts)))
            continue
        by_module.setdefault(m.target.module, []).append(m)
    d2b = fluxmaps.bfl_to_diffusers()
    for bfl, group in by_module.items():
        n_units = fluxmaps.units(bfl)
        pieces = d2b[bfl]
        if bfl_names:
            if len(group) == 1 and group[0].target.rows is None:
                m = group[0]
                out.append((_flux_name(bfl, "transformer", naming), _swap(m) if m.target.swap else dict(m.parts)))
            else:
                whole = [m for m in group if m.target.rows is None]
                if whole:
                    raise InvalidInputError(f"{whole[0].source}: the file has both a module on the whole {bfl} and "
                                            f"modules on parts of it")
                out.append((_flux_name(bfl, "transformer", naming),
                            _fuse(sorted(group, key=lambda m: m.target.rows[0]), n_units)))
            continue
        for m in group:
            if len(pieces) == 1 and pieces[0][1] is None:  # same module in both namings
                d, _, pswap = pieces[0]
                out.append((_flux_name(d, "transformer", naming), _swap(m) if m.target.swap != pswap else dict(m.parts)))
                continue
            a, k = m.target.rows if m.target.rows is not None else (0, n_units)
            inside = [(d, (max(a, b), min(a + k, b + c) - max(a, b))) for d, (b, c), _ in pieces
                      if max(a, b) < min(a + k, b + c)]
            if len(inside) == 1 and inside[0][1] == (a, k):
                out.append((_flux_name(inside[0][0], "transformer", naming), dict(m.parts)))
                continue
            out += [(_flux_name(d, "transformer", naming), p) for d, p in _split(m, inside, a)]
    return out


# ------------------------------------------------------------------------------------------------- convert
def read_modules(path: PathLike) -> Tuple[str, str, List[Module], Dict[str, str]]:
    """(architecture, naming, modules, metadata) of a LoRA file; every key must belong to a module with a
    target, else the conversion would drop it: refused, naming the keys."""
    p = Path(path)
    with open_model(p) as r:
        keys = r.keys()
        meta = dict(r.metadata)
        arch = guess_lora_arch(keys, meta)
        if arch is None:
            raise InvalidInputError("the file holds no tensors", p)
        naming = detect_naming(keys, arch)
        groups, bundled = group_modules(keys, arch)
        mods: List[Module] = []
        bad: List[str] = []
        for mod, parts in groups.items():
            t = resolve_name(mod, arch) if parts else None
            if t is None:
                bad.append(mod)
                continue
            mods.append(Module(t, {part: r.get(k) for part, k in parts.items()}, mod))
    if bad:
        raise InvalidInputError(f"{len(bad)} module(s) match no {arch} layer (e.g. {', '.join(bad[:3])}); converting "
                                f"would drop them", p)
    if bundled:
        raise InvalidInputError(f"the file bundles {len(bundled)} embedding tensor(s) (bundle_emb.*), which only the "
                                f"kohya naming carries", p)
    return arch, naming, mods, meta


#: the safetensors metadata field diffusers (>= 0.34) reads the LoRA config from: ``{"unet.r": ..,
#: "unet.lora_alpha": .., "unet.rank_pattern": {..}, "unet.alpha_pattern": {..}, "unet.target_modules": [..]}``
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def _diffusers_adapter_metadata(named: List[Tuple[str, Dict[str, torch.Tensor]]]) -> Dict[str, object]:
    """The LoRA config diffusers' SD loaders need to apply alpha/rank: they ignore ``.alpha`` keys in its own
    naming (only its kohya path reads them) and take the config from this metadata instead (Flux's loader reads the
    ``.alpha`` keys and refuses both at once, so Flux files get none)."""
    by_comp: Dict[str, Dict[str, Tuple[int, float]]] = {}
    for name, parts in named:
        if set(parts) - {"alpha"} != {_UP, _DOWN}:
            continue
        comp, mod = name.split(".", 1)
        r = int(parts[_DOWN].shape[0])
        a = float(parts["alpha"].double()) if "alpha" in parts else float(r)
        by_comp.setdefault(comp, {})[mod] = (r, a)
    out: Dict[str, object] = {}
    for comp, mods in by_comp.items():
        ranks = [r for r, _ in mods.values()]
        alphas = [a for _, a in mods.values()]
        r0 = max(set(ranks), key=ranks.count)
        a0 = max(set(alphas), key=alphas.count)
        out[f"{comp}.r"] = r0
        out[f"{comp}.lora_alpha"] = a0
        out[f"{comp}.target_modules"] = sorted(mods)
        out[f"{comp}.rank_pattern"] = {m: r for m, (r, _) in mods.items() if r != r0}
        out[f"{comp}.alpha_pattern"] = {m: a for m, (_, a) in mods.items() if a != a0}
    return out


def _part_name(part: str, naming: str) -> str:
    return _DIFFUSERS_PARTS.get(part, part) if naming in ("diffusers", "peft") else part


def convert(src: PathLike, out: PathLike, to: str, overwrite: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    """Write ``out`` = ``src`` in naming ``to`` (one of :data:`NAMINGS`). Returns a summary."""
    if to not in NAMINGS:
        raise InvalidInputError(f"unknown naming {to!r} (one of {', '.join(NAMINGS)})")
    outp = check_output_path(out, [src], overwrite)
    if outp.suffix.lower() != ".safetensors":
        raise InvalidInputError("the converted LoRA is written as .safetensors", outp)
    arch, naming, mods, meta = read_modules(src)
    odd = next((m for m in mods if m.parts.keys() & {"set_weight", "lora_up.bias"}), None)
    if odd is not None:
        what = "norm value" if "set_weight" in odd.parts else "lora_B bias"
        raise InvalidInputError(f"{odd.source}: a control LoRA's {what} (BFL Canny/Depth LoRAs carry them); lora "
                                f"convert does not write those in another naming: use the file as it is (bake and "
                                f"inspect read it)", src)
    if is_flux(arch):
        named = _flux_out(mods, to)
    else:
        te_paths = _te_hf_paths(arch)
        named = []
        for m in mods:
            try:
                named.append((_sd_name(m.target, to, arch, te_paths), dict(m.parts)))
            except (KeyError, ValueError):
                raise InvalidInputError(f"{m.source}: no {to} name for its target {m.target.module}", src) from None
    tensors: Dict[str, torch.Tensor] = {}
    for name, parts in named:
        for part, t in parts.items():
            k = f"{name}.{_part_name(part, to)}"
            if k in tensors:
                raise InvalidInputError(f"two modules of the input map to {k}", src)
            tensors[k] = t.contiguous()
    meta = dict(meta)
    meta.pop(DIFFUSERS_METADATA_KEY, None)
    if to == "diffusers" and not is_flux(arch):
        adapter = _diffusers_adapter_metadata(named)
        if adapter:
            meta[DIFFUSERS_METADATA_KEY] = json.dumps(adapter, sort_keys=True)
    meta["sdtoolkit_lora_convert"] = json.dumps({"from": naming, "to": to, "source": Path(src).name})
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
        for i, (k, v) in enumerate(tensors.items()):
            w.write(k, v)
            if progress:
                progress(i + 1, len(tensors))
    return {"output": str(outp), "arch": arch, "source_naming": naming, "naming": to, "modules_in": len(mods),
            "modules_out": len(named), "tensors": len(tensors)}


__all__ = ["convert", "detect_naming", "read_modules", "NAMINGS"]
