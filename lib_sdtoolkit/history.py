"""Recipe history: every merge, prune, bake and LoRA tool run, appended to a JSON-lines file in its output folder.

One line per finished run: ``{"id", "time", "job", "request", "output", "size", "sha256", "input_sha256"}``. The
request is the job's request as the face sent it (model names as the client named them), so the same job re-run
with it through the same kind of host reads the same inputs; merges and the LoRA tools write no time or random
value into their files, so a re-run gives a byte-identical file (the re-run's report says whether it did).

The file is ``sdtoolkit-history.jsonl`` beside the outputs (one per output folder: the checkpoint folder's
history travels with the checkpoints). Lines are appended with one ``write`` on a file opened for appending, so
two processes writing at once do not interleave within a line; a line that does not parse (a crash mid-write, a
hand edit) is skipped when reading and counted. A history that cannot be written (a read-only folder) never fails
the run that produced the output: the run's report says so.

Which recipes a model file carries in its metadata (ours and the WebUI merger's ``sd_merge_recipe``) is
:func:`recipes_in_metadata`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import InvalidInputError

HISTORY_FILE = "sdtoolkit-history.jsonl"

#: jobs whose runs are recorded: they write a model file from a recipe
RECORDED = ("merge", "merge-save-current", "prune")


def is_recorded(job: str) -> bool:
    """Merges, prune and every LoRA tool that writes a file (not ``lora-inspect``)."""
    return job in RECORDED or (job.startswith("lora-") and job != "lora-inspect")


def history_path(folder: Path) -> Path:
    return Path(folder) / HISTORY_FILE


def make_entry(job: str, request: Mapping[str, Any], output: Path, sha256: Optional[str],
               input_sha256: Optional[Mapping[str, Any]] = None, when: Optional[float] = None) -> Dict[str, Any]:
    when = time.time() if when is None else when
    entry: Dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
        "job": job,
        "request": dict(request),
        "output": Path(output).name,
        "size": Path(output).stat().st_size if Path(output).exists() else None,
        "sha256": sha256,
    }
    if input_sha256:
        entry["input_sha256"] = dict(input_sha256)
    body = json.dumps(entry, sort_keys=True, default=str)
    entry["id"] = hashlib.sha256(f"{when!r}{body}".encode()).hexdigest()[:12]
    return entry


def append(folder: Path, entry: Mapping[str, Any]) -> Path:
    """Append one entry (one line, one write) to the folder's history file."""
    path = history_path(folder)
    line = (json.dumps(dict(entry), default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def read(folder: Path) -> Tuple[List[Dict[str, Any]], int]:
    """(entries oldest first, number of lines skipped as unreadable). A missing file is an empty history."""
    path = history_path(folder)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise InvalidInputError(f"cannot read the history: {e.strerror or e}", path=path) from None
    entries: List[Dict[str, Any]] = []
    bad = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("request"), dict) \
                and isinstance(e.get("job"), str):
            e["folder"] = str(folder)
            entries.append(e)
        else:
            bad += 1
    return entries, bad


def find(folders: Iterable[Path], entry_id: str) -> Dict[str, Any]:
    """The entry with this id (or a unique prefix of at least 4 characters) in any of ``folders``."""
    entry_id = (entry_id or "").strip().lower()
    if len(entry_id) < 4:
        raise InvalidInputError("name a history entry by its id (at least 4 characters)")
    hits = [e for f in folders for e in read(f)[0] if e["id"].startswith(entry_id)]
    if not hits:
        raise InvalidInputError(f"no history entry {entry_id!r} (list them with `history`)")
    if len({e["id"] for e in hits}) > 1:
        raise InvalidInputError(f"{entry_id!r} names {len(hits)} history entries; give more of the id")
    return hits[0]


def recipes_in_metadata(metadata: Mapping[str, str]) -> Dict[str, Any]:
    """The recipes a model file carries: the WebUI merger's and ours (``sd_merge_recipe``, ``sd_merge_models``),
    and every ``sdtoolkit_*`` field (prune, bake, LoRA tools), JSON-decoded where they are JSON."""
    out: Dict[str, Any] = {}
    for k, v in (metadata or {}).items():
        if k in ("sd_merge_recipe", "sd_merge_models") or k.startswith("sdtoolkit_"):
            try:
                out[k] = json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
            except ValueError:
                out[k] = v
    return out


__all__ = ["HISTORY_FILE", "is_recorded", "history_path", "make_entry", "append", "read", "find",
           "recipes_in_metadata"]
