"""Prune a checkpoint: keep the architecture's components, drop EMA and junk, convert float dtypes, stream out.

* The components come from ``arch.detect`` + ``arch.split_components``; ``model_ema.*`` is dropped unless
  ``keep_ema``, junk (DDPM buffers, ``loss.*``, ``logvar``, unknown keys) unless ``keep_junk``.
* Floating tensors are converted to the chosen dtype (``fp16`` default, ``bf16``, ``fp32``, or ``keep``);
  integer and bool tensors keep theirs. CLIP ``position_ids`` are an index tensor and are never converted;
  ``fix_position_ids`` replaces them with ``arange`` in int64 (a merge may have turned 76 into 75.9975).
* ``only`` keeps just some components (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``; ``text_encoders``
  means both). Flux.1: ``transformer`` (``unet`` names it too), ``vae``, ``text_encoder`` (CLIP-L),
  ``text_encoder_2`` (T5-XXL); an all-in-one file drops whatever is not named.
* marker keys (``v_pred``, ``ztsnr``, ``edm_*``) are kept, as stored, whenever the UNet / transformer is. Extracting exactly one component can write *bare* keys (the component prefix removed):
  that is the default for ``only=["vae"]``, because a standalone VAE file (the WebUI's ``models/VAE``) holds
  ``encoder.*``/``decoder.*`` keys; other components keep their prefixes unless ``bare=True``.
* The output goes through the atomic streaming writer (``.safetensors``) one tensor at a time, or is saved as a
  ``.ckpt``/``.pt`` pickle (``{"state_dict": ...}``, built in memory). The input is never overwritten.
  safetensors metadata of the input is kept, except hashes of the old bytes (``sshs_model_hash``,
  ``sshs_legacy_hash``, ``modelspec.hash_sha256``), and ``sdtoolkit_prune`` records what was done.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .arch import detect, fixed_position_ids, position_ids_key, position_ids_state, split_components
from .errors import ArchitectureError, InvalidInputError
from .files import StreamingSafetensorsWriter, check_output_path, open_model, save_ckpt

PathLike = Union[str, "os.PathLike[str]"]

DTYPES: Dict[str, Optional[torch.dtype]] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                            "fp32": torch.float32, "keep": None}
COMPONENT_NAMES = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "controlnet")
_COMPONENT_ALIASES = {"text_encoders": ("text_encoder", "text_encoder_2"), "te": ("text_encoder", "text_encoder_2"),
                      "clip": ("text_encoder", "text_encoder_2"), "te1": ("text_encoder",),
                      "te2": ("text_encoder_2",), "model": ("unet",)}
#: metadata that describes the old file's bytes, wrong after pruning
STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def parse_only(value: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    """``"unet,vae"`` or a list -> component names (aliases resolved); None/empty -> None (all components)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    out: List[str] = []
    for raw in items:
        p = raw.strip().lower()
        if not p:
            continue
        names = _COMPONENT_ALIASES.get(p, (p,))
        for n in names:
            if n not in COMPONENT_NAMES:
                raise InvalidInputError(f"unknown component '{raw.strip()}' (known: {', '.join(COMPONENT_NAMES)}, "
                                        f"{', '.join(_COMPONENT_ALIASES)})")
            if n not in out:
                out.append(n)
    return out or None


@dataclass
class PruneOptions:
    dtype: str = "fp16"
    keep_ema: bool = False
    keep_junk: bool = False
    fix_position_ids: bool = False
    only: Optional[List[str]] = None
    #: strip the component prefix (one component only); None: automatic (True for ``only=["vae"]``)
    bare: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unknown dtype '{self.dtype}' (expected one of {', '.join(DTYPES)})")
        self.only = parse_only(self.only)


@dataclass
class PrunePlan:
    """What the output will hold: ``entries`` are ``(input key, output key, output dtype, shape)`` in file order."""

    architecture: str
    variant: Optional[str]
    entries: List[Tuple[str, str, torch.dtype, Tuple[int, ...]]]
    dropped: Dict[str, int]
    kept: Dict[str, int]
    converted: int
    position_ids: Dict[str, Any]
    prefix_stripped: Optional[str]
    out_bytes: int


@dataclass
class PruneResult:
    input: str
    output: Optional[str]
    architecture: str
    in_file_size: int
    out_file_size: int
    kept: Dict[str, int]
    dropped: Dict[str, int]
    converted: int
    dtype: str
    position_ids: Dict[str, Any] = field(default_factory=dict)
    prefix_stripped: Optional[str] = None
    #: False when nothing would change: no file was written (``output`` is None) and ``note`` says why
    written: bool = True
    note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def plan_prune(reader: Any, options: PruneOptions) -> PrunePlan:
    """Decide what to keep from an open reader (``files.open_model``)."""
    infos = reader.infos()
    info = detect(infos)
    if info.architecture == "unknown":
        raise ArchitectureError("cannot tell what this file is (not an SD or Flux.1 checkpoint, VAE, text encoder, "
                                "LoRA or ControlNet); nothing to prune", reader.path)
    groups = split_components(infos, info)
    present = [c for c in groups if c not in ("ema", "junk", "marker")]
    wanted = options.only
    if wanted is not None and "transformer" in groups and "unet" not in groups:
        # Flux's denoiser is its transformer: "unet" / "model" name it too
        wanted = list(dict.fromkeys("transformer" if c == "unet" else c for c in wanted))
    if wanted is not None:
        missing = [c for c in wanted if c not in groups]
        if missing:
            raise InvalidInputError(f"the file has no {', '.join(missing)} (it has: {', '.join(present) or 'none'})",
                                    reader.path)
    keep_comps = set(wanted if wanted is not None else present)
    if options.keep_ema and (wanted is None or "unet" in wanted):
        keep_comps.add("ema")
    if options.keep_junk and wanted is None:
        keep_comps.add("junk")
    if keep_comps & {"unet", "transformer"}:
        keep_comps.add("marker")  # v_pred / ztsnr: hosts sample a model without them as eps (noise)
    bare = options.bare if options.bare is not None else (wanted == ["vae"])
    strip = None
    if bare:
        one = wanted if wanted is not None else present
        if len(one) != 1:
            raise InvalidInputError("bare keys need exactly one component (--only COMPONENT)", reader.path)
        strip = info.prefixes.get(one[0], "") or ""
        if info.architecture == "VAE":
            strip = "first_stage_model."
    target = DTYPES[options.dtype]
    pkey = position_ids_key(infos)
    comp_of = {k: c for c, ks in groups.items() for k in ks}
    entries: List[Tuple[str, str, torch.dtype, Tuple[int, ...]]] = []
    kept: Dict[str, int] = {}
    dropped: Dict[str, int] = {}
    converted = 0
    out_bytes = 0
    for k in reader.keys():
        c = comp_of[k]
        if c not in keep_comps:
            dropped[c] = dropped.get(c, 0) + 1
            continue
        ti = infos[k]
        dt = ti.dtype
        shape = tuple(ti.shape)
        if c == "marker":
            pass  # kept exactly as stored: hosts test for the key
        elif k == pkey or k.endswith("position_ids"):
            if options.fix_position_ids:
                dt = torch.int64
        elif dt.is_floating_point and target is not None and dt != target:
            dt = target
            converted += 1
        name = k[len(strip):] if strip and k.startswith(strip) else k
        entries.append((k, name, dt, shape))
        kept[c] = kept.get(c, 0) + 1
        out_bytes += int(torch.empty((), dtype=dt).element_size()) * ti.numel
    names = [e[1] for e in entries]
    if len(set(names)) != len(names):
        raise InvalidInputError("stripping the prefix would give two tensors the same name; keep the prefix",
                                reader.path)
    if not entries:
        raise InvalidInputError("nothing would be kept", reader.path)
    pstate = position_ids_state(reader.get(pkey)) if pkey and pkey in {e[0] for e in entries} else \
        {"state": "missing", "dtype": None, "wrong": []}
    return PrunePlan(info.architecture, info.variant, entries, dropped, kept, converted,
                     {"key": pkey, **pstate, "fixed": bool(options.fix_position_ids and pkey)}, strip, out_bytes)


def _metadata(src_meta: Dict[str, str], fmt: str, options: PruneOptions, plan: PrunePlan) -> Dict[str, str]:
    meta = {k: v for k, v in src_meta.items() if k not in STALE_METADATA} if fmt == "safetensors" else {}
    meta["sdtoolkit_prune"] = json.dumps({
        "dtype": options.dtype, "keep_ema": options.keep_ema, "keep_junk": options.keep_junk,
        "fix_position_ids": options.fix_position_ids, "only": options.only, "bare": plan.prefix_stripped is not None,
        "architecture": plan.architecture, "dropped": plan.dropped}, sort_keys=True)
    return meta


def changes_of(plan: PrunePlan, in_format: str, out_format: str) -> List[str]:
    """What pruning by ``plan`` would change, in words; empty when the output would hold the input's tensors as
    they are (then no file is written: a copy with a new metadata entry is not a pruned model)."""
    out: List[str] = []
    if plan.dropped:
        out.append("drops " + ", ".join(f"{c} ({n} keys)" for c, n in plan.dropped.items()))
    if plan.converted:
        out.append(f"converts {plan.converted} floating tensors")
    if any(key != name for key, name, _, _ in plan.entries):  # a bare VAE "stripped" of a prefix it lacks: no change
        out.append(f"strips the '{plan.prefix_stripped}' prefix")
    pid = plan.position_ids or {}
    if pid.get("fixed") and (pid.get("state") != "ok" or pid.get("dtype") != "int64"):
        out.append("resets CLIP position_ids")
    if in_format != out_format:
        out.append(f"converts {in_format} to {out_format}")
    return out


def _dtype_words(plan: PrunePlan) -> str:
    dts = sorted({str(e[2]).replace("torch.", "") for e in plan.entries})
    return "/".join(dts) or "as it is"


def default_output_name(input_name: PathLike, options: PruneOptions) -> str:
    """``<stem>.vae.safetensors`` for a VAE extract, else ``<stem>[-comp...]-pruned-<dtype>.safetensors`` (named
    from the options the prune runs with, never from earlier ones)."""
    stem = os.path.splitext(os.path.basename(os.fspath(input_name)))[0]
    only = options.only or []
    if only == ["vae"]:
        return f"{stem}.vae.safetensors"
    suffix = "-" + "-".join(only) if only else ""
    return f"{stem}{suffix}-pruned-{options.dtype}.safetensors"


def prune_file(path: PathLike, out: PathLike, options: Optional[PruneOptions] = None, overwrite: bool = False,
               progress: Optional[Callable[[int, int], None]] = None) -> PruneResult:
    """Prune ``path`` into ``out`` (``.safetensors`` streamed; ``.ckpt``/``.pt``/``.pth`` pickled)."""
    options = options or PruneOptions()
    out_p = Path(out)
    suffix = out_p.suffix.lower()
    if suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise InvalidInputError("the output must end in .safetensors, .ckpt, .pt or .pth", out_p)
    with open_model(path) as r:
        plan = plan_prune(r, options)
        in_size = r.file_size
        out_format = "safetensors" if suffix == ".safetensors" else "ckpt"
        if not changes_of(plan, r.format, out_format):
            return PruneResult(str(path), None, plan.architecture, in_size, in_size, plan.kept, plan.dropped, 0,
                               options.dtype, plan.position_ids, None, written=False,
                               note=f"nothing would change: every tensor is kept as it is (already "
                                    f"{_dtype_words(plan)}, no EMA or junk to drop); no file written")
        out_p = check_output_path(out_p, [path], overwrite)
        meta = _metadata(dict(r.metadata), r.format, options, plan)
        total = len(plan.entries)

        def tensors():
            for i, (k, name, dt, shape) in enumerate(plan.entries):
                if options.fix_position_ids and k == plan.position_ids.get("key"):
                    n = 1
                    for s in shape:
                        n *= s
                    t = fixed_position_ids(n).reshape(shape)
                else:
                    t = r.get(k)
                    if t.dtype != dt:
                        t = t.to(dt)
                yield i, name, t.contiguous()

        if suffix == ".safetensors":
            specs = [(name, dt, shape) for _, name, dt, shape in plan.entries]
            with StreamingSafetensorsWriter(out_p, specs, meta, overwrite=overwrite) as w:
                for i, name, t in tensors():
                    w.write(name, t)
                    if progress is not None:
                        progress(i + 1, total)
        else:
            sd = {}
            for i, name, t in tensors():
                sd[name] = t
                if progress is not None:
                    progress(i + 1, total)
            save_ckpt(out_p, sd, overwrite=overwrite)
    return PruneResult(str(path), str(out_p), plan.architecture, in_size, os.path.getsize(out_p), plan.kept,
                       plan.dropped, plan.converted, options.dtype, plan.position_ids, plan.prefix_stripped)


__all__ = ["DTYPES", "COMPONENT_NAMES", "PruneOptions", "PrunePlan", "PruneResult", "parse_only", "plan_prune",
           "prune_file", "changes_of", "default_output_name", "STALE_METADATA"]
