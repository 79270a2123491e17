"""``python -m lib_sdtoolkit lora ACTION``: one sub-command per LoRA job (``jobs.lora.ACTIONS``), flags derived
from its request."""
from __future__ import annotations

from typing import Any

EPILOGS = {
    "bake": "LORA[:MULT]: a trailing :number is the multiplier (default 1), e.g. style.safetensors:0.7",
    "extract": "--clamp-quantile 1 keeps the factors as the SVD gives them; --dtype sets the written precision.",
}


def register(subparsers: Any) -> None:
    from ..jobs.faces import add_cli
    from ..jobs.lora import ACTIONS as LORA_ACTIONS
    from ..jobs.lora_convert import ACTIONS as CONVERT_ACTIONS

    ACTIONS = {**LORA_ACTIONS, **CONVERT_ACTIONS}

    p = subparsers.add_parser("lora", help=f"LoRA tools: {', '.join(ACTIONS)}")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    for action, spec in ACTIONS.items():
        add_cli(sub, spec, action, epilog=EPILOGS.get(action), quiet_flag=action != "inspect")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
