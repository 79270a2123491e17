"""``python -m lib_sdtoolkit controlnet ...``: run preprocessors and inspect ControlNet model files.

    controlnet detect IMAGE --module canny [--res 512] [--a 100] [--b 200] -o OUT.png [--overwrite]
    controlnet detect IMAGE --module canny --pixel-perfect --width 768 --height 512 -o OUT.png
    controlnet models [--models-dir DIR | --webui-dir DIR]   the models as sd-webui-controlnet titles them
    controlnet modules            list preprocessors with their sliders (and the unavailable ones with the reason)
    controlnet info MODEL         what a ControlNet file is (family, format, outputs)

Every sub-command prints a table, or JSON with ``--json``.
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

    add_cli(sub, get("controlnet-detect"), "detect", render=render_detect,
            epilog="Sliders: -1 means the module's default; `controlnet modules` lists each module's sliders, "
                   "ranges and defaults. A value outside a slider's range is replaced by its default (as "
                   "sd-webui-controlnet does) and the output says so.")

    ml = add_cli(sub, get("controlnet-models"), "models", host_factory=_models_host)
    where = ml.add_mutually_exclusive_group()
    where.add_argument("--models-dir", metavar="DIR", help="a WebUI-style models folder (its ControlNet/ is listed; "
                                                           "default: $SDTOOLKIT_MODELS_DIR or ./models)")
    where.add_argument("--webui-dir", metavar="DIR", help="an existing WebUI's folder")

    m = sub.add_parser("modules", help="list the preprocessors with their sliders (label, range, default)")
    m.add_argument("--json", action="store_true", help="print {available: {module: sliders}, unavailable: "
                                                       "{module: reason}} as JSON")
    m.set_defaults(func=_modules)

    i = sub.add_parser("info", help="recognise a ControlNet model file")
    i.add_argument("model", help="a ControlNet model file (.safetensors, .pth, .ckpt; diffusers or ldm layout)")
    i.add_argument("--json", action="store_true", help="print the facts as JSON")
    i.set_defaults(func=_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def render_detect(r: Any) -> str:
    from ..jobs.faces import key_value_table

    return key_value_table([("output", r.output), ("module", r.module), ("map", f"{r.width}x{r.height} px"),
                            ("note", r.note)])


def _models_host(args: argparse.Namespace) -> Any:
    """``controlnet models``: the folders of a models / WebUI folder (which host, not part of the request)."""
    from ..host import StandaloneHost

    return StandaloneHost(models_dir=args.models_dir, webui_dir=args.webui_dir)


def _slider_text(s: Any) -> str:
    if s is None:
        return "-"
    hidden = ", hidden" if not s.visible else ""
    return f"{s.label} {s.minimum:g}..{s.maximum:g} (default {s.value:g}{hidden})"


def _modules(args: argparse.Namespace) -> int:
    from ..jobs.faces import format_table
    from .preprocessors import PREPROCESSORS, UNAVAILABLE

    if args.json:
        print(json.dumps({"available": {n: p.sliders() for n, p in PREPROCESSORS.items()},
                          "unavailable": UNAVAILABLE}, indent=1))
        return 0
    rows = [(n, _slider_text(p.resolution), _slider_text(p.slider_1), _slider_text(p.slider_2))
            for n, p in PREPROCESSORS.items()]
    print(format_table(["module", "resolution", "threshold_a (--a)", "threshold_b (--b)"], rows))
    notes = [(n, p.note) for n, p in PREPROCESSORS.items() if p.note]
    if notes:
        print()
        for n, note in notes:
            print(f"{n}: {note}")
    print()
    print(format_table(["unavailable", "why"], list(UNAVAILABLE.items())))
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..jobs.faces import key_value_table
    from .models import load_control_model

    m = load_control_model(args.model)
    info = {"path": args.model, "family": m.family, "format": m.source_format, "outputs": m.num_outputs,
            "context_dim": m.context_dim, "model_channels": m.model_channels,
            "parameters": sum(p.numel() for p in m.net.parameters())}
    print(json.dumps(info, indent=1) if args.json else key_value_table(list(info.items())))
    return 0
