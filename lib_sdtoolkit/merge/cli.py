"""``python -m lib_sdtoolkit merge A B [C] -o OUT ...``: the merge job's flags, derived from ``MergeRequest``;
the methods' list and help come from their declarations (:mod:`lib_sdtoolkit.merge.methods`)."""
from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    from ..jobs import get
    from ..jobs.faces import add_cli
    from . import methods as merge_methods

    add_cli(subparsers, get("merge"),
            epilog="methods:\n" + "\n".join("  " + line for line in merge_methods.summary_lines()))
