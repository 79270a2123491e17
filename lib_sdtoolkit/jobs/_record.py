"""Recording finished runs in the recipe history (:mod:`lib_sdtoolkit.history`), and the host's hash cache.

:class:`~lib_sdtoolkit.jobs.base.JobSpec` wraps the ``run`` of every recorded job (merges, prune, the LoRA tools
that write a file) with :func:`recording` when the spec is made, so every face's run is recorded the same way. Recording never fails a run: the
output is written and good, its history line is a convenience.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..progress import Progress

log = logging.getLogger("sdtoolkit")


def hash_cache(host: Any) -> Any:
    """The host's hash cache (``sdtoolkit_hash_cache`` setting, else the default place): the merge reads its input
    hashes from it and stores the ones it computes, so a later merge reads each input once."""
    from ..files.hash_cache import HashCache

    settings = getattr(host, "settings", None) or {}
    return HashCache(settings.get("sdtoolkit_hash_cache") or None)


def output_sha256(host: Any, path: Path, progress: Any) -> Optional[str]:
    """sha256 of a file just written, through the host's hash cache (so a later merge that takes it as an input
    does not read it twice)."""
    from ..files.hashes import hash_file

    with hash_cache(host) as cache:
        hit = cache.get_hashes(path, ["sha256"])
        if hit is not None:
            return hit.sha256
        st = os.stat(path)
        res = hash_file(path, ["sha256"], progress=progress)
        cache.put_hashes(res, st)
        return res.sha256


def _absolute_models(req: Any) -> Dict[str, Any]:
    """The CLI's request with its model paths made absolute (a re-run may start in another folder)."""
    def absolute(x: Any) -> Any:
        if isinstance(x, dict):   # lora bake's ``loras``: [{"lora": NAME, "multiplier": M, "lbw": ...}]
            return {k: (absolute(v) if k == "lora" else v) for k, v in x.items()}
        if isinstance(x, str) and x and Path(x).expanduser().exists():
            return str(Path(x).expanduser().resolve())
        return x

    d = req.to_dict()
    for s in req.fields():
        v = d.get(s.name)
        if not s.model or v in (None, "", []):
            continue
        d[s.name] = [absolute(x) for x in v] if isinstance(v, list) else absolute(v)
    return d


def record(host: Any, job: str, req: Any, report: Any, progress: Any = None) -> Optional[Dict[str, Any]]:
    """Append a finished run to its output folder's history (nothing for an in-memory merge or a prune that wrote
    no file). Returns the entry, or None."""
    from .. import history

    try:
        d = report.to_dict()
        out = d.get("output")
        if d.get("in_memory") or not out or d.get("written") is False:
            return None
        path = Path(str(out))
        if not path.is_file():
            return None
        # a streamed merge hashes its output as it writes it (the report's output_sha256, also put into the hash
        # cache); only outputs nobody hashed while writing (.ckpt, the other jobs' files) are read again here
        sha = d.get("output_sha256")
        if not sha or path.stat().st_size != d.get("bytes_written"):
            tick = progress.bytes("hashing the output") if isinstance(progress, Progress) else None
            sha = output_sha256(host, path, tick)
        request = _absolute_models(req) if host.trusted else req.to_dict()
        entry = history.make_entry(job, request, path, sha, d.get("input_sha256"))
        history.append(path.parent, entry)
        return entry
    except Exception as e:  # noqa: BLE001 - the run's own result stands
        log.warning("sdtoolkit: could not record the %s run in the history: %s", job, e)
        return None


def recording(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a job's run) followed by :func:`record`."""
    if getattr(fn, "records_history", False):
        return fn

    @functools.wraps(fn)
    def run(host: Any, request: Any, progress: Any) -> Any:
        report = fn(host, request, progress)
        record(host, name, request, report, progress)
        return report

    run.records_history = True  # type: ignore[attr-defined]
    return run


__all__ = ["hash_cache", "output_sha256", "record", "recording"]
