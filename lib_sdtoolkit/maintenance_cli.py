"""``prune``, ``hash`` and ``dedup`` on the command line (registered by ``lib_sdtoolkit.cli``).

``python -m lib_sdtoolkit prune FILE -o OUT [--dtype fp16|bf16|fp32|keep] [--keep-ema] [--keep-junk]
[--fix-position-ids] [--only unet,vae,text_encoder] [--bare | --keep-prefix]``

  Extracting a component is ``--only``: ``prune model.safetensors --only vae -o my.vae.safetensors`` writes a
  standalone VAE with bare ``encoder.*``/``decoder.*`` keys, as the WebUI's ``models/VAE`` folder expects
  (``--keep-prefix`` keeps ``first_stage_model.``); ``--only unet`` keeps ``model.diffusion_model.`` unless
  ``--bare``.

``python -m lib_sdtoolkit hash FILE_OR_DIR... [--json] [--algo sha256,autov1,autov3,blake3,crc32|all]
[--cache PATH | --no-cache] [--webui-dir DIR]``

``python -m lib_sdtoolkit dedup DIR... [--json] [--kind vae|checkpoint|lora|controlnet|any]
[--action report|hardlink|move --to DIR] [--cache PATH | --no-cache]``

Exit codes: 0 done; 2 bad input, or (hash, dedup) some files could not be read or changed while read; they are
listed on stderr and the others are still processed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

from .errors import InvalidInputError, SdToolkitError


def _progress_bar(desc: str) -> Optional[Callable[[int, int], None]]:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: List[Any] = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False))
        bar[0].n = done
        bar[0].refresh()
        if done >= total:
            bar[0].close()

    return update


def _open_cache(args: argparse.Namespace):
    if getattr(args, "no_cache", False):
        return None
    from .files.hash_cache import HashCache

    return HashCache(args.cache) if args.cache else HashCache()


# ------------------------------------------------------------------------------------------------ prune

def _cmd_prune(args: argparse.Namespace) -> int:
    from .dedup import human_bytes
    from .prune import PruneOptions, prune_file

    if args.bare and args.keep_prefix:
        raise InvalidInputError("--bare and --keep-prefix contradict each other")
    bare = True if args.bare else (False if args.keep_prefix else None)
    opts = PruneOptions(dtype=args.dtype, keep_ema=args.keep_ema, keep_junk=args.keep_junk,
                        fix_position_ids=args.fix_position_ids, only=args.only, bare=bare)
    res = prune_file(args.file, args.output, opts, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(f"{res.input}: {res.architecture}, {human_bytes(res.in_file_size)}")
    print("  kept: " + ", ".join(f"{c} {n}" for c, n in res.kept.items()))
    if res.dropped:
        print("  dropped: " + ", ".join(f"{c} {n} keys" for c, n in res.dropped.items()))
    if res.converted:
        print(f"  converted {res.converted} floating tensors to {res.dtype}")
    pid = res.position_ids or {}
    if pid.get("fixed"):
        print(f"  CLIP position_ids reset to 0..N-1 (int64); wrong before: {pid.get('wrong') or 'none'}")
    elif pid.get("state") == "broken":
        print(f"  warning: CLIP position_ids are broken ({pid.get('dtype')}); add --fix-position-ids")
    if res.prefix_stripped:
        print(f"  keys written without the '{res.prefix_stripped}' prefix")
    saved = res.in_file_size - res.out_file_size
    print(f"{res.output}: {human_bytes(res.out_file_size)} (before {human_bytes(res.in_file_size)}, "
          f"saved {human_bytes(saved)})")
    return 0


# ------------------------------------------------------------------------------------------------ hash

def _webui_kind(path: Path, webui_models: Path) -> Optional[str]:
    p = os.path.abspath(path)
    for kind, sub in (("checkpoint", "Stable-diffusion"), ("lora", "Lora")):
        d = os.path.join(os.path.abspath(webui_models), sub)
        if p.startswith(d + os.sep):
            return kind
    return None


def _cmd_hash(args: argparse.Namespace) -> int:
    from .dedup import iter_model_files
    from .files.hash_cache import WebUIHashCache, cached_hash_file
    from .files.hashes import normalize_algos

    algos = normalize_algos(args.algo) if args.algo else None
    webui = None
    if args.webui_dir:
        wd = Path(args.webui_dir)
        if not (wd / "models").is_dir():
            raise InvalidInputError("not a WebUI folder (it has no models/ folder)", wd)
        webui = WebUIHashCache.from_webui_env(wd)
        if algos is not None:  # the WebUI needs sha256, and the addnet hash for safetensors LoRAs
            algos = normalize_algos(list(algos) + ["sha256", "autov3"])
    files: List[Path] = []
    problems: List[str] = []
    for raw in args.files:
        p = Path(raw)
        if p.is_dir():
            files.extend(iter_model_files([p]))
        elif p.exists():
            files.append(p)
        else:
            problems.append(f"{p}: no such file")
    cache = _open_cache(args)
    results = []
    written = 0
    try:
        for p in files:
            try:
                res = cached_hash_file(p, algos, cache, progress=_progress_bar(p.name))
            except SdToolkitError as e:
                problems.append(str(e))
                continue
            if res.changed:
                problems.append(f"{p}: the file changed while it was hashed; the values are not trustworthy and "
                                f"were not cached")
                continue
            results.append(res)
            if webui is not None:
                kind = _webui_kind(p, Path(args.webui_dir) / "models")
                if kind:
                    dirs = [Path(args.webui_dir) / "models" / "Stable-diffusion"]
                    written += webui.record(kind, [res], dirs)
    finally:
        if cache is not None:
            cache.close()
        if webui is not None:
            webui.close()
    if args.json:
        out = [dict(r.to_dict(), civitai=r.civitai()) for r in results]
        print(json.dumps(out[0] if len(out) == 1 and len(args.files) == 1 and not problems else out, indent=2))
    else:
        for r in results:
            print(r.path + (" (cached)" if r.source == "cache" else ""))
            for a in r.algos:
                v = getattr(r, a)
                label = {"sha256": "SHA256", "autov1": "AutoV1", "autov3": "AutoV3", "blake3": "BLAKE3",
                         "crc32": "CRC32"}[a]
                print(f"  {label:<7} {v if v is not None else '(not a safetensors file)'}")
                if a == "sha256":
                    print(f"  {'AutoV2':<7} {r.autov2}")
        if webui is not None:
            print(f"{written} entries written to the WebUI's hash cache ({webui.backend})")
    for msg in problems:
        print(f"error: {msg}", file=sys.stderr)
    return 2 if problems else 0


# ------------------------------------------------------------------------------------------------ dedup

def _cmd_dedup(args: argparse.Namespace) -> int:
    from .dedup import dedup, format_report

    if args.action == "move" and not args.to:
        raise InvalidInputError("--action move needs --to DIR")
    if args.to and args.action != "move":
        raise InvalidInputError("--to is only for --action move")
    for d in args.dirs:
        if not Path(d).exists():
            raise InvalidInputError("no such file or folder", d)
    cache = _open_cache(args)
    try:
        res = dedup(args.dirs, kind=args.kind, action=args.action, to=args.to, cache=cache)
    finally:
        if cache is not None:
            cache.close()
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(format_report(res))
    for p in res.scan.problems:
        print(f"error: {p.path}: {p.reason}", file=sys.stderr)
    return 2 if res.scan.problems else 0


# ------------------------------------------------------------------------------------------------ register

def _cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cache", metavar="PATH", help="hash cache file (default: $SDTOOLKIT_CACHE_DIR/hashes-v2.sqlite "
                                                   "or ~/.cache/sd-toolkit/hashes-v2.sqlite)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the hash cache")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune", help="drop EMA and junk, convert dtypes, or extract one component (e.g. the VAE)",
        description="Keep the known components of the detected architecture, drop model_ema.* and junk, convert "
                    "floating tensors (integers keep their dtype) and write the result atomically. "
                    "--only vae extracts a standalone VAE with bare keys (the WebUI's VAE format).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=".safetensors (streamed) or .ckpt/.pt")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "keep"],
                   help="floating tensors become this (default fp16; keep = as they are)")
    p.add_argument("--keep-ema", action="store_true", help="keep model_ema.* weights")
    p.add_argument("--keep-junk", action="store_true", help="keep keys outside the known components")
    p.add_argument("--fix-position-ids", action="store_true", help="reset CLIP position_ids to 0..76 (int64)")
    p.add_argument("--only", metavar="LIST", help="comma list of components: unet, vae, text_encoder, "
                                                  "text_encoder_2 (text_encoders = both)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bare", action="store_true", help="strip the component prefix (one component only)")
    g.add_argument("--keep-prefix", action="store_true", help="keep first_stage_model. on --only vae")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_prune)

    h = subparsers.add_parser(
        "hash", help="sha256/AutoV2, AutoV1, AutoV3, BLAKE3, CRC32 in one read, cached",
        description="Compute file hashes in one read (AutoV2 = first 10 hex of sha256; AutoV1 = the WebUI's legacy "
                    "8-hex model hash; AutoV3 = sha256 after the safetensors header, the addnet/kohya hash). "
                    "Unchanged files are answered from the cache without reading them.")
    h.add_argument("files", nargs="+", metavar="FILE", help="files or folders (searched recursively)")
    h.add_argument("--json", action="store_true")
    h.add_argument("--algo", action="append", metavar="ALGO",
                   help="sha256 (autov2), autov1, autov3, blake3, crc32 or all; repeat or comma-separate "
                        "(default all)")
    h.add_argument("--webui-dir", metavar="DIR", help="also write the hashes into this WebUI's own hash cache "
                                                      "(checkpoints and LoRAs under DIR/models)")
    _cache_args(h)
    h.set_defaults(func=_cmd_hash)

    d = subparsers.add_parser(
        "dedup", help="find duplicate model files (identical bytes or identical weights)",
        description="Group files by identical bytes and by identical canonical weights (fp16-rounded, prefixes "
                    "stripped, EMA/junk dropped). Reports by default; --action hardlink replaces byte duplicates "
                    "with hard links (same filesystem only), --action move --to DIR moves duplicates away. "
                    "Nothing is ever deleted. Keeps .safetensors first, then the shortest name.")
    d.add_argument("dirs", nargs="+", metavar="DIR")
    d.add_argument("--json", action="store_true")
    d.add_argument("--kind", default="any", choices=["vae", "checkpoint", "lora", "controlnet", "any"])
    d.add_argument("--action", default="report", choices=["report", "hardlink", "move"])
    d.add_argument("--to", metavar="DIR", help="where --action move puts duplicates (must exist)")
    _cache_args(d)
    d.set_defaults(func=_cmd_dedup)
