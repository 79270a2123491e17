"""``python -m lib_sdtoolkit controlnet ...``: run preprocessors and inspect ControlNet model files.

    controlnet detect IMAGE --module canny [--res 512] [--a 100] [--b 200] -o OUT.png [--overwrite]
    controlnet modules            list preprocessors (and the unavailable ones with the reason)
    controlnet info MODEL         what a ControlNet file is (family, format, outputs)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("controlnet", help="ControlNet preprocessors and model files")
    sub = p.add_subparsers(dest="controlnet_command", metavar="SUBCOMMAND")

    d = sub.add_parser("detect", help="run a preprocessor on an image and write the detected map")
    d.add_argument("image")
    d.add_argument("--module", "-m", default="canny")
    d.add_argument("--res", type=float, default=-1, help="processor resolution (default: the module's)")
    d.add_argument("--a", "--threshold-a", dest="a", type=float, default=-1)
    d.add_argument("--b", "--threshold-b", dest="b", type=float, default=-1)
    d.add_argument("--seed", type=int, default=None, help="seed for random preprocessors (shuffle)")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_detect)

    m = sub.add_parser("modules", help="list the preprocessors")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_modules)

    i = sub.add_parser("info", help="recognise a ControlNet model file")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _detect(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..errors import FileNotFound
    from ..files import atomic_path, check_output_path
    from .preprocessors import run_preprocessor

    if not os.path.isfile(args.image):
        raise FileNotFound("no such image file", path=args.image)
    check_output_path(args.output, inputs=[args.image], overwrite=args.overwrite)
    with open(args.image, "rb") as f:
        data = f.read()
    out = run_preprocessor(args.module, data, args.res, args.a, args.b, seed=args.seed)
    buf = io.BytesIO()
    fmt = Image.registered_extensions().get(os.path.splitext(args.output)[1].lower(), "PNG")
    Image.fromarray(out).save(buf, format=fmt)
    with atomic_path(args.output, overwrite=args.overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
    print(f"{args.output}: {out.shape[1]}x{out.shape[0]} ({args.module})")
    return 0


def _modules(args: argparse.Namespace) -> int:
    from .preprocessors import PREPROCESSORS, UNAVAILABLE

    if args.json:
        print(json.dumps({"available": {n: p.sliders() for n, p in PREPROCESSORS.items()},
                          "unavailable": UNAVAILABLE}, indent=1))
        return 0
    for n, p in PREPROCESSORS.items():
        print(f"{n:20s} {', '.join(s['name'] for s in p.sliders())}" + (f"  ({p.note})" if p.note else ""))
    print("\nunavailable:")
    for n, why in UNAVAILABLE.items():
        print(f"  {n:28s} {why}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .models import load_control_model

    m = load_control_model(args.model)
    info = {"path": args.model, "family": m.family, "format": m.source_format, "outputs": m.num_outputs,
            "context_dim": m.context_dim, "model_channels": m.model_channels,
            "parameters": sum(p.numel() for p in m.net.parameters())}
    print(json.dumps(info, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0
