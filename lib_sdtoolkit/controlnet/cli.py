"""``python -m lib_sdtoolkit controlnet ...``: run preprocessors and inspect ControlNet model files.

    controlnet detect IMAGE --module canny [--res 512] [--a 100] [--b 200] -o OUT.png [--overwrite]
    controlnet models [--models-dir DIR | --webui-dir DIR]   the models as sd-webui-controlnet titles them
    controlnet modules            list preprocessors (and the unavailable ones with the reason)
    controlnet info MODEL         what a ControlNet file is (family, format, outputs)
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    from ..jobs import get
    from ..jobs.faces import add_cli

    p = subparsers.add_parser("controlnet", help="ControlNet preprocessors and model files")
    sub = p.add_subparsers(dest="controlnet_command", metavar="SUBCOMMAND")

    add_cli(sub, get("controlnet-detect"), "detect")

    ml = add_cli(sub, get("controlnet-models"), "models", host_factory=_models_host)
    where = ml.add_mutually_exclusive_group()
    where.add_argument("--models-dir", metavar="DIR", help="a WebUI-style models folder (its ControlNet/ is listed; "
                                                           "default: $SDTOOLKIT_MODELS_DIR or ./models)")
    where.add_argument("--webui-dir", metavar="DIR", help="an existing WebUI's folder")

    m = sub.add_parser("modules", help="list the preprocessors")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_modules)

    i = sub.add_parser("info", help="recognise a ControlNet model file")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _models_host(args: argparse.Namespace) -> Any:
    """``controlnet models``: the folders of a models / WebUI folder (which host, not part of the request)."""
    from ..host import StandaloneHost

    return StandaloneHost(models_dir=args.models_dir, webui_dir=args.webui_dir)


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
