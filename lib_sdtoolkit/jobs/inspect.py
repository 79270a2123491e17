"""Inspect job: what a model file holds (architecture, components, sizes, dtypes, EMA, junk, position_ids).

``python -m lib_sdtoolkit inspect FILE... [--kind KIND] [--json]``, ``GET /sdtoolkit/v1/inspect?path=...&kind=...``
and the Inspect tab are derived from :class:`InspectRequest`. Names go through the host's gate
(``resolve_input``); the feature (:func:`lib_sdtoolkit.inspect.inspect_file`) sees a path only. Before reading, the
folder of each file is swept for temporary files left by a killed write (their writer's pid gone), once its real
place is checked to be inside the host's folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..progress import Progress
from .base import JobSpec, Report, Request, param

KINDS = ("checkpoint", "vae", "lora", "controlnet")


@dataclass
class InspectRequest(Request):
    """One or more model files to inspect (the API takes one ``path``)."""

    job = "inspect"

    path: List[str] = param(help="model file(s): a path (CLI) or a name / path under the model folders",
                            positional=True, metavar="FILE")
    kind: Optional[str] = param(None, help="look the name up among models of this kind only", choices=KINDS)


@dataclass
class InspectReport(Report):
    """One report per file. ``to_dict`` is that file's report (what ``inspect --json`` and the API have always
    answered) for one file, ``{"reports": [...]}`` for several."""

    reports: List[Dict[str, Any]]
    _stale: List[str] = field(default_factory=list)  # full paths of removed temporary files (the CLI says so)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.reports[0]) if len(self.reports) == 1 else {"reports": [dict(r) for r in self.reports]}

    def summary(self) -> str:
        from ..inspect import format_report

        return "\n\n".join(format_report(r) for r in self.reports)


def _sweep(host: Any, files: List[Path]) -> List[Path]:
    """Stale temporary files removed from the files' folders (not their sub-folders); a folder whose real place
    is outside the host's folders (reached through a link) is left alone."""
    from ..errors import AccessDeniedError
    from ..files.writer import sweep_stale_temps

    folders: List[Path] = []
    for f in files:
        try:
            host.check_inside(f)
        except AccessDeniedError:
            continue
        if f.parent not in folders and f.parent.is_dir():
            folders.append(f.parent)
    return sweep_stale_temps(folders, recursive=False) if folders else []


def run(host: Any, req: InspectRequest, progress: Progress) -> InspectReport:
    from ..inspect import inspect_file

    if not req.path:
        from ..errors import InvalidInputError

        raise InvalidInputError("inspect: name a model file")
    files = [host.resolve_input(name, req.kind) for name in req.path]  # 403 / 404 before anything is read
    removed = _sweep(host, files)
    shown = (lambda p: str(p)) if host.trusted else host.display_name
    reports: List[Dict[str, Any]] = []
    for i, f in enumerate(files):
        progress("inspecting", i, len(files), f.name)
        rep = inspect_file(f)
        rep.setdefault("name", host.display_name(f))
        gone = [p for p in removed if p.parent == f.parent]
        if gone:
            rep["stale_temps_removed"] = [shown(p) for p in gone]
        reports.append(rep)
    progress("inspecting", len(files), len(files), "")
    return InspectReport(reports=reports, _stale=[str(p) for p in removed])


def cli_json(report: InspectReport) -> Any:
    """``inspect --json``: one object for one file, a list for several (as the CLI always printed)."""
    return report.reports[0] if len(report.reports) == 1 else report.reports


def stale_lines(report: InspectReport) -> List[str]:
    """What the CLI says on stderr about temporary files it removed."""
    return [f"removed a stale temporary file left by a killed write: {p}" for p in report._stale]


SPEC = JobSpec("inspect", InspectRequest, InspectReport, run,
               help="say what a model file holds (architecture, components, EMA, junk)",
               description="Say what a model file holds: architecture, components, sizes, dtypes, EMA, junk keys, "
                           "CLIP position_ids, and what pruning would leave. Reads the header only. --json prints "
                           "one object (a list for several files).")

__all__ = ["InspectRequest", "InspectReport", "SPEC", "run", "cli_json", "stale_lines", "KINDS"]
