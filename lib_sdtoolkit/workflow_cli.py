"""``compare``, ``history``, ``history-rerun`` and ``recipe`` on the command line: the jobs' flags, derived from
their requests (:mod:`lib_sdtoolkit.jobs.compare`, :mod:`lib_sdtoolkit.jobs.history`)."""
from __future__ import annotations

from typing import Any

COMPARE_EPILOG = """\
examples:
  compare a.safetensors b.safetensors            one row per merge block and component
  compare merged.safetensors x.safetensors y.safetensors --json
                                                 the pairwise matrix (is merged a mix of x and y?)
  compare model.safetensors my.vae.safetensors   a checkpoint's VAE against a VAE file
cosine: <a,b>/(|a||b|) over the group's weights; rel L2: |a-b|/|a|; same: identical values."""


def register(subparsers: Any) -> None:
    from .jobs import get
    from .jobs.faces import add_cli

    add_cli(subparsers, get("compare"), epilog=COMPARE_EPILOG)
    add_cli(subparsers, get("history"))
    add_cli(subparsers, get("history-rerun"))
    add_cli(subparsers, get("recipe"))
