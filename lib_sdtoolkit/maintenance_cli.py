"""``inspect``, ``prune``, ``hash`` and ``dedup`` on the command line: the jobs' flags, derived from their requests
(:mod:`lib_sdtoolkit.jobs.inspect`, :mod:`lib_sdtoolkit.jobs.maintenance`).

Exit codes: 0 done; 2 bad input, or (hash, dedup) some files could not be read or changed while read; they are
listed on stderr and the others are still processed.
"""
from __future__ import annotations

from typing import Any

PRUNE_EPILOG = """\
examples:
  prune model.ckpt -o pruned.safetensors              drop EMA and junk, floats to fp16
  prune model.safetensors --only vae -o my.vae.safetensors
                                                      a standalone VAE with bare encoder.*/decoder.* keys, as the
                                                      WebUI's models/VAE expects (--keep-prefix keeps
                                                      first_stage_model.); --only unet keeps its prefix unless --bare
When nothing would change (every tensor already as asked, no EMA or junk), no file is written."""

EXIT_EPILOG = "exit code 2 when some files could not be read or changed while read (listed on stderr)"


def register(subparsers: Any) -> None:
    from .jobs import get
    from .jobs.faces import add_cli
    from .jobs.inspect import cli_json, stale_lines
    from .jobs.maintenance import exit_code, hash_cli_json, problem_lines

    add_cli(subparsers, get("inspect"), json_view=cli_json, stderr=stale_lines)
    add_cli(subparsers, get("prune"), epilog=PRUNE_EPILOG)
    add_cli(subparsers, get("hash"), json_view=hash_cli_json, stderr=problem_lines, exit_code=exit_code,
            epilog=EXIT_EPILOG)
    add_cli(subparsers, get("dedup"), stderr=problem_lines, exit_code=exit_code, epilog=EXIT_EPILOG)
