"""Extract a LoRA from two Flux.1 checkpoints (tuned - base), streaming one BFL module at a time.

Fused weights are extracted as one module (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``: one SVD of the whole
fused ΔW, as kohya's Flux LoRAs hold them); from diffusers-layout files the pieces (``to_q``/``to_k``/``to_v``,
``proj_mlp``...) are read and stacked into the BFL module first (``norm_out.linear`` with its halves swapped back), so
the output always uses kohya's Flux names (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_...`` for CLIP-L).
Both files are read lazily: peak memory is one module's two weights and its factors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..arch import fluxmaps
from ..arch.keymaps import LoraTarget
from ..errors import ArchitectureError, InvalidInputError
from ..files import StreamingSafetensorsWriter
from .fluxbake import placements, swap_halves


def _targets() -> List[Tuple[str, LoraTarget]]:
    """(kohya name, target) of every BFL Linear module and CLIP-L Linear layer."""
    out = [("lora_unet_" + m.replace(".", "_"), LoraTarget(m, "transformer")) for m in fluxmaps.bfl_modules()]
    out += [("lora_te1_" + m.replace(".", "_"), LoraTarget(m, "text_encoder")) for m in fluxmaps.clip_l_modules()]
    return out


def _read(reader: Any, pl: List[Any]) -> torch.Tensor:
    parts = []
    for p in sorted(pl, key=lambda q: q.layer_rows[0] if q.layer_rows else 0):
        w = reader.get(p.key)
        w = (w if p.key_rows is None else w[p.key_rows[0]:p.key_rows[1]]).float()
        parts.append(swap_halves(w) if p.flip else w)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def extract_flux(rt: Any, rb: Any, at: Any, ab: Any, outp: Path, rank: int, svd: Callable[..., Any],
                 clamp_quantile: Optional[float], dev: torch.device, dtype: torch.dtype, overwrite: bool,
                 progress: Optional[Callable[[int, int], None]], min_diff: float, names: Tuple[str, str]
                 ) -> Dict[str, object]:
    """The Flux path of ``extract.extract_lora`` (readers and detections already open); ``svd(diff, rank,
    clamp_quantile)`` gives (up, down, ...)."""
    if at.architecture != ab.architecture:
        raise ArchitectureError(f"tuned model is {at.architecture}, base is {ab.architecture}", rt.path)
    st = {k: i.shape for k, i in rt.infos().items()}
    sb = {k: i.shape for k, i in rb.infos().items()}
    todo = []
    for name, t in _targets():
        try:
            pt, shape_t = placements(t, at.layout or "bfl", at.prefixes, st)
            pb, shape_b = placements(t, ab.layout or "bfl", ab.prefixes, sb)
        except KeyError:
            continue
        if not pt or not pb:
            continue
        if shape_t != shape_b:
            raise ArchitectureError(f"shapes differ: {shape_t} vs {shape_b}", rt.path, name)
        todo.append((name, pt, pb))
    if not todo:
        raise ArchitectureError("no Flux layer in common between the two files", rt.path)
    factors: Dict[str, torch.Tensor] = {}
    skipped = 0
    for i, (name, pt, pb) in enumerate(todo):
        diff = _read(rt, pt).to(dev) - _read(rb, pb).to(dev)
        if float(diff.abs().max()) <= min_diff:
            skipped += 1
            continue
        res = svd(diff, rank, clamp_quantile)
        up, down = res[0], res[1]
        factors[name + ".lora_up.weight"] = up.to("cpu", dtype).contiguous()
        factors[name + ".lora_down.weight"] = down.to("cpu", dtype).contiguous()
        factors[name + ".alpha"] = torch.tensor(float(up.shape[1]), dtype=dtype)
        del diff
        if progress:
            progress(i + 1, len(todo))
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
    return {"output": str(outp), "arch": "Flux.1", "layers": len(factors) // 3, "skipped_identical": skipped,
            "rank": rank, "conv_rank": None}


__all__ = ["extract_flux"]
