"""The command line: ``python -m lib_sdtoolkit COMMAND ...``.

Each feature registers its sub-commands from its own module (``register(subparsers)``); this file only
collects them and turns ``SdToolkitError`` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import SdToolkitError
from .plugins import import_present

COMMAND_MODULES = (
    "lib_sdtoolkit.maintenance_cli",  # inspect, prune, hash, dedup
    "lib_sdtoolkit.merge.cli",
    "lib_sdtoolkit.lora.cli",
    "lib_sdtoolkit.tiled_vae_cli",
    "lib_sdtoolkit.controlnet.cli",
    "lib_sdtoolkit.workflow_cli",  # compare, history, history-rerun, recipe
    "lib_sdtoolkit.serve_cli",  # serve (outside server/: importing that package imports FastAPI)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_sdtoolkit",
                                     description="SD Toolkit: inspect, merge, prune, hash, LoRA, tiled VAE, ControlNet")
    parser.add_argument("--version", action="version", version=f"sd-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in import_present(COMMAND_MODULES, "command", strict=True):
        mod.register(sub)
    return parser


_PARSER: Optional[argparse.ArgumentParser] = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _PARSER
    if _PARSER is None:  # built once per process: argparse spends ~0.1 s building ours, parse_args keeps no state
        _PARSER = build_parser()
    parser = _PARSER
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SdToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
