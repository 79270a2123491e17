"""``python -m lib_sdtoolkit merge A B [C] -o OUT ...``: the merge job's flags, derived from ``MergeRequest``."""
from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    from ..jobs import get
    from ..jobs.faces import add_cli

    add_cli(subparsers, get("merge"))
