"""Say what a model file holds: architecture, components, sizes, dtypes, EMA, junk, position_ids.

Only the header is read (plus the 77-element position_ids tensor), so inspecting a multi-GB file is fast and
uses little memory.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .arch import (
    ArchInfo,
    detect,
    position_ids_key,
    position_ids_state,
    split_components,
)
from .files import open_model

#: the component order used in reports
COMPONENT_ORDER = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "controlnet",
                   "marker", "ema", "junk")


def _fp16_bytes(dtype: torch.dtype, nbytes: int) -> int:
    """What a tensor would take after converting floats to fp16 (integers keep their dtype)."""
    if dtype in (torch.float32,):
        return nbytes // 2
    if dtype == torch.float64:
        return nbytes // 4
    return nbytes


def inspect_file(path) -> Dict[str, Any]:
    """The report as a JSON-able dict (``architecture``, ``format``, ``components``, ``ema``, ``junk``,
    ``position_ids``, ``total_bytes`` and more)."""
    with open_model(path) as r:
        infos = r.infos()
        info: ArchInfo = detect(infos, r.metadata)
        groups = split_components(infos, info)
        pkey = position_ids_key(infos)
        pstate = position_ids_state(r.get(pkey) if pkey else None)
        metadata = dict(r.metadata)
        fmt, file_size = r.format, r.file_size
    comps: Dict[str, Dict[str, int]] = {}
    for name in sorted(groups, key=lambda c: COMPONENT_ORDER.index(c) if c in COMPONENT_ORDER else 99):
        ks = groups[name]
        comps[name] = {"keys": len(ks), "bytes": sum(infos[k].nbytes for k in ks)}
    dtypes: Dict[str, Dict[str, int]] = {}
    for i in infos.values():
        d = dtypes.setdefault(str(i.dtype).replace("torch.", ""), {"keys": 0, "bytes": 0})
        d["keys"] += 1
        d["bytes"] += i.nbytes
    kept = [k for c, ks in groups.items() if c not in ("ema", "junk") for k in ks]
    kept_bytes = sum(infos[k].nbytes for k in kept)
    pruned_fp16 = sum(_fp16_bytes(infos[k].dtype, infos[k].nbytes) for k in kept)
    ema = {"keys": comps.get("ema", {}).get("keys", 0), "bytes": comps.get("ema", {}).get("bytes", 0)}
    junk = groups.get("junk", [])
    report: Dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "file_size": file_size,
        "architecture": info.architecture,
        "variant": info.variant,
        "layout": info.layout,
        "prediction": info.prediction,
        "prediction_source": info.prediction_source,
        "ztsnr": info.ztsnr,
        "markers": info.markers,
        "family": info.named_family,
        "family_source": info.named_family_source,
        "notes": info.notes,
        "total_keys": len(infos),
        "total_bytes": sum(i.nbytes for i in infos.values()),
        "components": {c: v for c, v in comps.items() if c not in ("ema", "junk")},
        "ema": ema,
        "junk": junk,
        "junk_bytes": sum(infos[k].nbytes for k in junk),
        "dtypes": dtypes,
        "fp16_savings_bytes": kept_bytes - pruned_fp16,
        "position_ids": pstate["state"] if pkey or info.architecture in ("SD1", "SDXL") else "missing",
        "position_ids_detail": {"key": pkey, **pstate},
        "pruned_bytes": kept_bytes,
        "pruned_fp16_bytes": pruned_fp16,
        "metadata_keys": sorted(metadata),
    }
    return report


def human_bytes(n: Optional[float]) -> str:
    """Sizes for people, in binary units (``1.99 GiB``); ``""`` for None."""
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


def format_report(rep: Dict[str, Any]) -> str:
    """The report for people."""
    lines: List[str] = []
    arch = rep["architecture"] + (f" ({rep['variant']})" if rep.get("variant") else "")
    lines.append(f"{rep['path']}")
    lines.append(f"  architecture: {arch}    format: {rep['format']}    file: {human_bytes(rep['file_size'])}, "
                 f"{rep['total_keys']} tensors, {human_bytes(rep['total_bytes'])}")
    if rep.get("layout"):
        lines.append(f"  layout: {rep['layout']}")
    if rep.get("prediction"):
        lines.append(f"  prediction: {rep['prediction']} ({rep.get('prediction_source')})    "
                     f"zero terminal SNR: {'yes' if rep.get('ztsnr') else 'no'}")
    if rep.get("markers"):
        lines.append("  marker keys: " + ", ".join(rep["markers"]) + " (kept by prune and merge)")
    if rep.get("family"):
        lines.append(f"  family: {rep['family']} (from metadata {rep.get('family_source')})")
    for n in rep.get("notes", []):
        lines.append(f"  note: {n}")
    lines.append("  components:")
    for name, c in rep["components"].items():
        lines.append(f"    {name:<15} {c['keys']:>6} keys  {human_bytes(c['bytes']):>10}")
    lines.append(f"    {'ema':<15} {rep['ema']['keys']:>6} keys  {human_bytes(rep['ema']['bytes']):>10}")
    lines.append(f"    {'junk':<15} {len(rep['junk']):>6} keys  {human_bytes(rep['junk_bytes']):>10}")
    lines.append("  dtypes: " + ", ".join(f"{d} {v['keys']} keys / {human_bytes(v['bytes'])}"
                                           for d, v in rep["dtypes"].items()))
    if rep["junk"]:
        shown = rep["junk"][:8]
        more = len(rep["junk"]) - len(shown)
        lines.append("  junk keys: " + ", ".join(shown) + (f", ... (+{more})" if more > 0 else ""))
    pd = rep["position_ids_detail"]
    pid = rep["position_ids"]
    if pid == "broken":
        wrong = pd.get("wrong", [])
        pid += f" ({pd.get('dtype')}; wrong indices: {wrong[:10]}{'...' if len(wrong) > 10 else ''})"
    lines.append(f"  CLIP position_ids: {pid}")
    if rep["fp16_savings_bytes"]:
        lines.append(f"  fp32 weights: converting to fp16 would save {human_bytes(rep['fp16_savings_bytes'])}")
    if rep["architecture"] not in ("LoRA", "ControlNet", "unknown"):
        if rep["ema"]["keys"] or rep["junk"] or rep["fp16_savings_bytes"]:
            lines.append(f"  pruning would leave {human_bytes(rep['pruned_bytes'])} "
                         f"({human_bytes(rep['pruned_fp16_bytes'])} as fp16)")
        else:
            lines.append("  pruning would change nothing")
    return "\n".join(lines)
