"""``python -m lib_sdtoolkit lora extract|bake|inspect``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _progress(desc: str):
    from tqdm import tqdm

    bar = {"b": None}

    def tick(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        bar["b"].n = done
        bar["b"].refresh()
        if done >= total:
            bar["b"].close()

    return tick


def _extract(args: Any) -> int:
    from .extract import extract_lora

    res = extract_lora(args.tuned, args.base, args.output, rank=args.rank, conv_rank=args.conv_rank,
                       clamp_quantile=args.clamp_quantile, device=args.device, dtype=args.dtype,
                       overwrite=args.overwrite, progress=None if args.quiet else _progress("extract"))
    print(json.dumps(res))
    return 0


def _bake(args: Any) -> int:
    from .bake import bake, parse_lora_arg

    res = bake(args.checkpoint, [parse_lora_arg(s) for s in args.loras], args.output, overwrite=args.overwrite,
               progress=None if args.quiet else _progress("bake"))
    print(json.dumps(res))
    return 0


def _inspect(args: Any) -> int:
    from .inspect_lora import inspect_lora

    rep = inspect_lora(args.file)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"{rep['path']}  ({rep['format']}, {rep['tensors']} tensors)")
    print(f"  base model : {rep['base_model']}")
    print(f"  types      : {', '.join(f'{k} x{v}' for k, v in rep['types'].items()) or '-'}")
    print(f"  ranks      : {', '.join(f'{k} x{v}' for k, v in rep['ranks'].items()) or '-'}")
    print(f"  alphas     : {', '.join(f'{k} x{v}' for k, v in rep['alphas'].items()) or '-'}")
    print(f"  targets    : {', '.join(f'{k} {v}' for k, v in rep['targets'].items()) or '-'}")
    if rep["dora_layers"]:
        print(f"  DoRA layers: {rep['dora_layers']}")
    if rep["unmatched"]:
        print(f"  unmatched  : {rep['unmatched']} (e.g. {', '.join(rep['unmatched_examples'])})")
    for k in sorted(rep["metadata"]):
        v = rep["metadata"][k]
        print(f"  {k} = {v if len(v) < 120 else v[:117] + '...'}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("lora", help="LoRA tools: extract, bake, inspect")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    e = sub.add_parser("extract", help="extract a LoRA from TUNED - BASE by SVD")
    e.add_argument("tuned")
    e.add_argument("base")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--rank", type=int, default=32)
    e.add_argument("--conv-rank", type=int, default=None, help="also extract ResNet/sampler layers (LoCon)")
    e.add_argument("--clamp-quantile", type=float, default=0.99, help="1 disables clamping")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_extract)
    b = sub.add_parser("bake", help="write CHECKPOINT with LoRAs merged in")
    b.add_argument("checkpoint")
    b.add_argument("loras", nargs="+", metavar="LORA[:MULT]")
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=_bake)
    i = sub.add_parser("inspect", help="type, rank, alpha, targets, base model, metadata")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
