"""The job layer: one ``run(host, request, progress) -> report`` per user action, shared by every face.

Faces (``cli.py``, ``server/``, ``ui/``, the WebUI's ``scripts/``) only translate: they build a request with
``Request.from_dict`` (or the derivations in :mod:`lib_sdtoolkit.jobs.faces`), call :func:`run`, and render the
report. Jobs are the only code that resolves client names (``host.resolve_input`` / ``resolve_output`` /
``resolve_folder``), builds output paths, refreshes the host's lists; the features under them take paths,
tensors and a progress callable, never a Host.

Each job module defines ``SPEC = JobSpec(...)``; :data:`JOB_MODULES` lists them so that a face can ask for
``get("merge")`` without importing the others (nor torch: request modules are torch-free; ``run`` imports the
feature when called).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Mapping, Union

from ..errors import InvalidInputError
from ..progress import Progress, as_progress
from .base import JobSpec, Report, Request, param

#: job name -> module defining ``SPEC`` (a module may define more than one spec: ``SPECS``)
JOB_MODULES: Dict[str, str] = {
    "merge": "lib_sdtoolkit.jobs.merge",
    "merge-in-memory": "lib_sdtoolkit.jobs.merge",
    "merge-save-current": "lib_sdtoolkit.jobs.merge",
    "merge-restore": "lib_sdtoolkit.jobs.merge",
    "inspect": "lib_sdtoolkit.jobs.inspect",
    "prune": "lib_sdtoolkit.jobs.maintenance",
    "hash": "lib_sdtoolkit.jobs.maintenance",
    "dedup": "lib_sdtoolkit.jobs.maintenance",
    "lora-extract": "lib_sdtoolkit.jobs.lora",
    "lora-bake": "lib_sdtoolkit.jobs.lora",
    "lora-inspect": "lib_sdtoolkit.jobs.lora",
    "lora-resize": "lib_sdtoolkit.jobs.lora",
    "lora-merge": "lib_sdtoolkit.jobs.lora",
    "lora-convert": "lib_sdtoolkit.jobs.lora_convert",
    "vae-decode": "lib_sdtoolkit.jobs.tiled_vae",
    "vae-encode": "lib_sdtoolkit.jobs.tiled_vae",
    "controlnet-detect": "lib_sdtoolkit.jobs.controlnet",
    "controlnet-models": "lib_sdtoolkit.jobs.controlnet",
    "compare": "lib_sdtoolkit.jobs.compare",
    "history": "lib_sdtoolkit.jobs.history",
    "history-rerun": "lib_sdtoolkit.jobs.history",
    "recipe": "lib_sdtoolkit.jobs.history",
}


def register_module(name: str, module: str) -> None:
    """Add a job module (used by job modules written after this table, and by tests)."""
    JOB_MODULES[name] = module


def get(name: str) -> JobSpec:
    mod_name = JOB_MODULES.get(name)
    if mod_name is None:
        raise InvalidInputError(f"unknown job {name!r} (known: {', '.join(sorted(JOB_MODULES))})")
    mod = importlib.import_module(mod_name)
    specs = getattr(mod, "SPECS", None) or {getattr(mod, "SPEC").name: getattr(mod, "SPEC")}
    try:
        spec = specs[name]
    except KeyError:
        raise InvalidInputError(f"job module {mod_name} does not define job {name!r}") from None
    return spec


def run(name: str, host: Any, request: Union[Request, Mapping[str, Any]], progress: Any = None) -> Report:
    """Run job ``name``: ``request`` is its request dataclass or a mapping checked by ``from_dict``."""
    spec = get(name)
    if not isinstance(request, Request):
        request = spec.request.from_dict(request)
    elif not isinstance(request, spec.request):
        raise InvalidInputError(f"job {name!r} takes a {spec.request.__name__}, got {type(request).__name__}")
    return spec.run(host, request, as_progress(progress))


__all__ = ["JOB_MODULES", "JobSpec", "Request", "Report", "param", "get", "run", "register_module", "Progress"]
