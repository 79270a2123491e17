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


_HASH_LABELS = {"sha256": "SHA256", "autov1": "AutoV1", "autov3": "AutoV3", "blake3": "BLAKE3", "crc32": "CRC32"}


def render_hash(report: Any) -> str:
    """One row per file: the file, AutoV2 (the WebUI's short hash) and each algorithm asked for (one file: the
    same as name/value lines, which stay readable with all six hashes)."""
    from .jobs.faces import format_table, key_value_table

    algos = [a for a in _HASH_LABELS if any(a in r.get("algos", ()) for r in report.results)]
    headers = ["file"] + (["AutoV2"] if "sha256" in algos else []) + [_HASH_LABELS[a] for a in algos]
    rows = []
    for r in report.results:
        cells = [r["path"] + (" (cached)" if r.get("source") == "cache" else "")]
        if "sha256" in algos:
            cells.append(r.get("autov2") or "-")
        for a in algos:
            v = r.get(a) if a in r.get("algos", ()) else None
            cells.append(v if v is not None else ("-" if a not in r.get("algos", ()) else "(not safetensors)"))
        rows.append(cells)
    if len(rows) == 1:
        lines = [key_value_table(list(zip(headers, rows[0])))]
    else:
        lines = [format_table(headers, rows)] if rows else ["(no files hashed)"]
    if report._webui_backend is not None:
        lines.append(f"{report.webui_cache_entries} entries written to the WebUI's hash cache "
                     f"({report._webui_backend})")
    if report.cache_warning:
        lines.append(f"warning: {report.cache_warning}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    from .jobs import get
    from .jobs.faces import add_cli
    from .jobs.inspect import cli_json, stale_lines
    from .jobs.maintenance import exit_code, hash_cli_json, problem_lines

    add_cli(subparsers, get("inspect"), json_view=cli_json, stderr=stale_lines)
    add_cli(subparsers, get("prune"), epilog=PRUNE_EPILOG)
    add_cli(subparsers, get("hash"), json_view=hash_cli_json, stderr=problem_lines, exit_code=exit_code,
            epilog=EXIT_EPILOG, render=render_hash)
    add_cli(subparsers, get("dedup"), stderr=problem_lines, exit_code=exit_code, epilog=EXIT_EPILOG)
