"""``python -m lib_sdtoolkit lora ACTION``: one sub-command per LoRA job (``jobs.lora.ACTIONS``), flags derived
from its request."""
from __future__ import annotations

from typing import Any

EPILOGS = {
    "bake": "LORA[:MULT]: a trailing :number is the multiplier (default 1), e.g. style.safetensors:0.7",
    "extract": "The factors are the SVD's (a difference of rank <= --rank comes back to --dtype's precision); "
               "--clamp-quantile 0.99 clamps them as kohya does (lossy). --json lists every layer's rank and kept "
               "energy.",
    "resize": "sv_ratio P: keep singular values > s_max/P; sv_fro P: keep the fraction P of the Frobenius norm; "
              "sv_cumulative P: keep the fraction P of the sum of singular values (kohya's resize_lora.py rules).",
    "merge": "LORA[:WEIGHT]: a trailing :number is the weight (default 1; negative subtracts). The output's "
             "metadata key sdtoolkit_merged_from holds [{file, weight, metadata}] of every input.",
    "inspect": "Reasons a module is not applied: unknown target name, unsupported type; with --model also shape "
               "mismatch and wrong architecture.",
}


def register(subparsers: Any) -> None:
    from ..jobs.faces import add_cli
    from ..jobs.lora import ACTIONS

    p = subparsers.add_parser("lora", help=f"LoRA tools: {', '.join(ACTIONS)}")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    for action, spec in ACTIONS.items():
        add_cli(sub, spec, action, epilog=EPILOGS.get(action), quiet_flag=action != "inspect")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
