"""``python -m lib_sdtoolkit lora ACTION``: one sub-command per LoRA job (``jobs.lora.ACTIONS``), flags derived
from its request; the results as short tables (``--json``: the report as the API answers it)."""
from __future__ import annotations

from typing import Any, Callable, Dict

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


def _size(path: Any) -> str:
    import os

    from ..inspect import human_bytes

    try:
        return f"{path} ({human_bytes(os.path.getsize(path))})"
    except (OSError, TypeError):
        return str(path)


def render_extract(r: Any) -> str:
    from ..jobs.faces import key_value_table

    ranks = f"{r.rank}" + (f" (conv {r.conv_rank})" if r.conv_rank else "")
    control = None
    if r.control:
        wide = ", ".join(f"{m} {v['from'][1]} -> {v['to'][1]} channels" for m, v in r.control["widened"].items())
        control = f"BFL control LoRA ({wide}; {r.control['set_layers']} qk-norm scales set)"
    return key_value_table([("output", _size(r.output)), ("architecture", r.arch), ("layers", r.layers),
                            ("rank", ranks), ("identical layers skipped", r.skipped_identical or None),
                            ("control", control)])


def render_bake(r: Any) -> str:
    from ..jobs.faces import format_table, key_value_table

    head = key_value_table([("output", _size(r.output)), ("architecture", r.arch), ("tensors changed", r.touched)])
    rows = [(x["path"], f"{x['multiplier']:g}", x["layers"], x.get("unmatched") or 0) for x in r.loras]
    widened = "".join(f"\n{k}: widened from {v['from']} to {v['to']} (a control LoRA: the checkpoint now takes the "
                      f"control image's latents beside the noise)" for k, v in (r.widened or {}).items())
    return (head + "\n\n" + format_table(["LoRA", "multiplier", "layers", "unmatched"], rows, right=(1, 2, 3))
            + ("\n" + widened if widened else ""))


RENDER: Dict[str, Callable[[Any], str]] = {"extract": render_extract, "bake": render_bake}


def register(subparsers: Any) -> None:
    from ..jobs.faces import add_cli
    from ..jobs.lora import ACTIONS as LORA_ACTIONS
    from ..jobs.lora_convert import ACTIONS as CONVERT_ACTIONS

    ACTIONS = {**LORA_ACTIONS, **CONVERT_ACTIONS}

    p = subparsers.add_parser("lora", help=f"LoRA tools: {', '.join(ACTIONS)}")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    for action, spec in ACTIONS.items():
        add_cli(sub, spec, action, epilog=EPILOGS.get(action), render=RENDER.get(action))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
