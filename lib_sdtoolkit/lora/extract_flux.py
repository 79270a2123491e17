"""Extract a LoRA from two Flux.1 checkpoints (tuned - base), streaming one BFL module at a time.

Fused weights are extracted as one module (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``: one SVD of the whole
fused ΔW, as kohya's Flux LoRAs hold them); from diffusers-layout files the pieces (``to_q``/``to_k``/``to_v``,
``proj_mlp``...) are read and stacked into the BFL module first (``norm_out.linear`` with its halves swapped back), so
the output always uses kohya's Flux names (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_...`` for CLIP-L).
Both files are read lazily: peak memory is one module's two weights and its factors.

**A control model against its base** (FLUX.1 Canny/Depth dev against FLUX.1 dev: the tuned ``img_in`` takes more
input channels) gives a control LoRA in BFL's own layout, the one its Canny/Depth LoRAs ship in and ComfyUI and
diffusers load: ``<module>.lora_A.weight`` / ``lora_B.weight`` on every Linear layer (no alpha: scale 1), the bias
differences as ``lora_B.bias``, the tuned qk-norms as ``<norm>.scale`` (set, not added), and ``img_in``'s ΔW against
the base widened with zero columns (:func:`lib_sdtoolkit.lora.fluxbake.widened`). Every layer is written, identical
ones too, as BFL's files have them (diffusers' converter expects all of them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..arch import fluxmaps
from ..arch.keymaps import LoraTarget
from ..errors import ArchitectureError, InvalidInputError
from ..files import StreamingSafetensorsWriter
from .fluxbake import WIDENABLE, placements, swap_halves, widened


def _targets() -> List[Tuple[str, LoraTarget]]:
    """(kohya name, target) of every BFL Linear module and CLIP-L Linear layer."""
    out = [("lora_unet_" + m.replace(".", "_"), LoraTarget(m, "transformer")) for m in fluxmaps.bfl_modules()]
    out += [("lora_te1_" + m.replace(".", "_"), LoraTarget(m, "text_encoder")) for m in fluxmaps.clip_l_modules()]
    return out


def _read(reader: Any, pl: List[Any], param: str = "weight") -> Optional[torch.Tensor]:
    """The BFL module's ``param`` (``weight``; ``bias``: the same rows of each piece's bias) in fp32; None when a
    piece has no such tensor."""
    parts = []
    for p in sorted(pl, key=lambda q: q.layer_rows[0] if q.layer_rows else 0):
        key = p.key if param == "weight" else p.key[: -len(".weight")] + "." + param
        if key not in reader:
            return None
        w = reader.get(key)
        w = (w if p.key_rows is None else w[p.key_rows[0]:p.key_rows[1]]).float()
        parts.append(swap_halves(w) if p.flip else w)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _wider(t: LoraTarget, shape_t: Tuple[int, ...], shape_b: Tuple[int, ...]) -> bool:
    """True when the tuned module is the base's widened by input channels (a control model's ``img_in``)."""
    return (t.component == "transformer" and t.module in WIDENABLE and len(shape_t) == 2 and len(shape_b) == 2
            and shape_t[0] == shape_b[0] and shape_t[1] > shape_b[1])


def extract_flux(rt: Any, rb: Any, at: Any, ab: Any, outp: Path, rank: int, svd: Callable[..., Any],
                 clamp_quantile: Optional[float], dev: torch.device, dtype: torch.dtype, overwrite: bool,
                 progress: Optional[Callable[[int, int], None]], min_diff: float, names: Tuple[str, str]
                 ) -> Dict[str, object]:
    """The Flux path of ``extract.extract_lora`` (readers and detections already open); ``svd(diff, rank,
    clamp_quantile)`` gives (up, down, kept energy, method)."""
    if at.architecture != ab.architecture:
        raise ArchitectureError(f"tuned model is {at.architecture}, base is {ab.architecture}", rt.path)
    st = {k: i.shape for k, i in rt.infos().items()}
    sb = {k: i.shape for k, i in rb.infos().items()}
    todo = []
    widen: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    for name, t in _targets():
        try:
            pt, shape_t = placements(t, at.layout or "bfl", at.prefixes, st)
            pb, shape_b = placements(t, ab.layout or "bfl", ab.prefixes, sb)
        except KeyError:
            continue
        if not pt or not pb:
            continue
        if shape_t != shape_b:
            if not _wider(t, shape_t, shape_b):
                raise ArchitectureError(f"shapes differ: {shape_t} vs {shape_b}", rt.path, name)
            widen[t.module] = (tuple(shape_b), tuple(shape_t))
        todo.append((name, t, pt, pb, shape_t))
    if not todo:
        raise ArchitectureError("no Flux layer in common between the two files", rt.path)
    control = bool(widen)
    factors: Dict[str, torch.Tensor] = {}
    per_layer: List[Dict[str, object]] = []
    skipped = 0
    for i, (name, t, pt, pb, shape_t) in enumerate(todo):
        base = _read(rb, pb)
        diff = _read(rt, pt).to(dev) - (widened(base, shape_t) if t.module in widen else base).to(dev)
        del base
        if not control and float(diff.abs().max()) <= min_diff:
            skipped += 1
            continue
        up, down, kept, method = svd(diff, rank, clamp_quantile)
        del diff
        out_name = t.module if control and t.component == "transformer" else name
        per_layer.append({"name": out_name, "rank": int(up.shape[1]), "energy": round(kept, 6), "svd": method})
        if control and t.component == "transformer":
            factors[out_name + ".lora_A.weight"] = down.to("cpu", dtype).contiguous()
            factors[out_name + ".lora_B.weight"] = up.to("cpu", dtype).contiguous()
            bt, bb = _read(rt, pt, "bias"), _read(rb, pb, "bias")
            if bt is not None and bb is not None:
                factors[out_name + ".lora_B.bias"] = (bt - bb).to(dtype).contiguous()
        else:
            factors[name + ".lora_up.weight"] = up.to("cpu", dtype).contiguous()
            factors[name + ".lora_down.weight"] = down.to("cpu", dtype).contiguous()
            factors[name + ".alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)
        if progress:
            progress(i + 1, len(todo))
    norms = 0
    if control:   # the tuned qk-norms, set by the LoRA
        for m in fluxmaps.norm_modules():
            t = LoraTarget(m, "transformer", param="scale")
            try:
                (pt, _), (pb, _) = (placements(t, at.layout or "bfl", at.prefixes, st),
                                    placements(t, ab.layout or "bfl", ab.prefixes, sb))
            except KeyError:
                continue
            factors[m + ".scale"] = rt.get(pt[0].key).to(dtype).contiguous()
            norms += 1
    if not factors:
        raise InvalidInputError("the two models do not differ in any LoRA target layer; nothing to extract", rt.path)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": "flux1", "ss_output_name": outp.stem,
            "ss_training_comment": f"extracted by sd-toolkit from {names[0]} - {names[1]}",
            "ss_sd_model_name": names[1]}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in factors.items()]
    with StreamingSafetensorsWriter(outp, specs, meta, overwrite=overwrite) as w:
        for k, v in factors.items():
            w.write(k, v)
    res: Dict[str, object] = {
        "output": str(outp), "arch": "Flux.1", "layers": len(per_layer), "skipped_identical": skipped,
        "rank": rank, "conv_rank": None, "min_energy": min(x["energy"] for x in per_layer) if per_layer else 1.0,
        "layer_report": per_layer}
    if control:
        res["control"] = {"widened": {m: {"from": list(a), "to": list(b)} for m, (a, b) in widen.items()},
                          "set_layers": norms}
    return res


__all__ = ["extract_flux"]
