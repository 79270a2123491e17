"""``python -m lib_sdtoolkit merge A B [C] -o OUT ...``: the merge job's flags, derived from ``MergeRequest``;
the methods' list and help come from their declarations (:mod:`lib_sdtoolkit.merge.methods`).
``merge --list-presets [--json]`` lists the named block-weight presets (no models needed)."""
from __future__ import annotations

import json
from typing import Any, List, Optional, Sequence


def presets_text(as_json: bool = False) -> str:
    """The MBW presets: name, BASE and the 25 SD1 UNet values (IN00..IN11, M00, OUT00..OUT11), rounded to 3
    decimals for people; ``--json``: the exact values."""
    from .presets import PRESETS

    if as_json:
        return json.dumps({n: {"base": b, "blocks": list(v)} for n, (b, v) in PRESETS.items()}, indent=2)
    from ..jobs.faces import format_table

    rows = [(n, f"{b:.3g}", ",".join(f"{x:.3f}".rstrip("0").rstrip(".") if x != int(x) else f"{int(x)}" for x in v))
            for n, (b, v) in PRESETS.items()]
    return (format_table(["preset", "BASE", "IN00..IN11, M00, OUT00..OUT11 (SD1; SDXL takes its 19 blocks from "
                                            "these)"], rows)
            + "\n\nuse: merge A B --preset NAME   (or --blocks with values of your own)")


def register(subparsers: Any) -> None:
    from ..jobs import get
    from ..jobs.faces import add_cli
    from . import methods as merge_methods

    p = add_cli(subparsers, get("merge"),
                epilog="methods:\n" + "\n".join("  " + line for line in merge_methods.summary_lines())
                + "\n\nmerge --list-presets [--json] lists the named block-weight presets.")
    p.add_argument("--list-presets", action="store_true", dest="_list_presets",
                   help="list the named block-weight presets (--preset NAME) with their values and exit; "
                        "no models are needed")
    parse = p.parse_known_args

    def parse_known_args(args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:
        # before argparse asks for the models A and B: --list-presets needs none
        got: List[str] = list(args or [])
        if "--list-presets" in got:
            print(presets_text("--json" in got))
            p.exit(0)
        return parse(args, namespace)

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]
