"""History jobs: the record of every merge, prune and LoRA tool run (:mod:`lib_sdtoolkit.history`), re-running an
entry, and the recipes a model file carries in its metadata.

* ``history``: list the entries of the model folders (or the folders named);
* ``history-rerun``: run an entry's request again into a new file and say whether it is byte-identical;
* ``recipe``: the recipes in a model's metadata (ours, and the WebUI merger's ``sd_merge_recipe``).

Recording is :func:`lib_sdtoolkit.jobs._record.record`, wrapped around the recorded jobs' run by ``JobSpec``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import InvalidInputError
from ..progress import Progress
from ._record import output_sha256
from .base import JobSpec, Report, Request, param

def _folders(host: Any, names: Optional[List[str]]) -> List[Path]:
    if names:
        return host.resolve_folders(names, "any")
    dirs = [d for d in host.all_model_dirs() if d.is_dir()]
    if dirs:
        return dirs
    if host.trusted:
        return [Path.cwd()]
    raise InvalidInputError("no model folder is configured")


# ----------------------------------------------------------------------------------------------------- history
@dataclass
class HistoryRequest(Request):
    """The history of the model folders (or of the folders named)."""

    job = "history"

    folders: Optional[List[str]] = param(None, help="folders whose history to list (default: every model folder; "
                                                    "CLI without model folders: the current folder)",
                                         positional=True, metavar="FOLDER")
    job_name: Optional[str] = param(None, help="only entries of this job (merge, prune, lora-bake, ...)",
                                    flag="--job", metavar="JOB")
    limit: int = param(50, help="newest N entries", minimum=1, maximum=10000)


@dataclass
class HistoryReport(Report):
    entries: List[Dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    def summary(self) -> str:
        if not self.entries:
            return "No history yet (merges, prunes and LoRA tool runs are recorded in their output folder)."
        lines = [f"{'id':<12}  {'time':<20}  {'job':<18}  output"]
        for e in self.entries:
            lines.append(f"{e['id']:<12}  {e['time']:<20}  {e['job']:<18}  {e['output']}")
        if self.skipped_lines:
            lines.append(f"({self.skipped_lines} unreadable lines skipped)")
        lines.append("Re-run one with: history-rerun ID")
        return "\n".join(lines)


def run_history(host: Any, req: HistoryRequest, progress: Progress) -> HistoryReport:
    from .. import history

    entries: List[Dict[str, Any]] = []
    bad = 0
    for f in _folders(host, req.folders):
        es, b = history.read(f)
        entries += es
        bad += b
    if req.job_name:
        entries = [e for e in entries if e["job"] == req.job_name]
    entries.sort(key=lambda e: e.get("time", ""), reverse=True)
    entries = entries[:req.limit]
    if not host.trusted:
        for e in entries:
            e["folder"] = host.display_name(e["folder"]) if e.get("folder") else None
    return HistoryReport(entries=entries, skipped_lines=bad)


# ----------------------------------------------------------------------------------------------------- re-run
@dataclass
class RerunRequest(Request):
    """Run a history entry's request again into a new file beside the original."""

    job = "history-rerun"

    entry: str = param(help="the entry's id (or a unique prefix of 4+ characters)", positional=True, metavar="ID")
    output: Optional[str] = param(None, help="output file name, written beside the original (default: "
                                              "NAME.rerun-ID.safetensors)", flag="--output", short="-o")
    overwrite: bool = param(False, help="replace an existing output")
    folders: Optional[List[str]] = param(None, help="folders whose history holds the entry (default: every model "
                                                    "folder)", flag="--folder", metavar="FOLDER")


@dataclass
class RerunReport(Report):
    entry: str
    job: str
    output: str
    sha256: Optional[str]
    original_sha256: Optional[str]
    identical: Optional[bool]
    report: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        same = {True: "byte-identical to the original", False: "DIFFERENT from the original (an input changed?)",
                None: "the original's hash was not recorded"}[self.identical]
        return f"Re-ran {self.job} {self.entry}: {self.output}\n{same}"


def run_rerun(host: Any, req: RerunRequest, progress: Progress) -> RerunReport:
    from .. import history
    from . import get

    entry = history.find(_folders(host, req.folders), req.entry)
    spec = get(entry["job"])
    folder = Path(entry["folder"])
    orig = Path(entry["output"])
    name = req.output or f"{orig.stem}.rerun-{entry['id'][:6]}{orig.suffix}"
    if os.sep in name or "/" in name:
        raise InvalidInputError("give the re-run's output as a file name (it is written beside the original)")
    data = dict(entry["request"])
    # beside the original: a path on the CLI's host, a plain name in the model folder elsewhere (where every
    # recorded job writes)
    data["output"] = str(folder / name) if host.trusted else name
    data["overwrite"] = bool(req.overwrite)
    if any(s.name == "custom_name" for s in spec.request.fields()) and not data.get("custom_name"):
        # the name a merge records in its metadata is the original's, so that the file can be byte-identical
        data["custom_name"] = orig.stem
    request = spec.request.from_dict(data)
    report = spec.run(host, request, progress)
    out = Path(str(report.to_dict().get("output") or folder / name))
    sha = output_sha256(host, out, None) if out.is_file() else None
    orig = entry.get("sha256")
    return RerunReport(entry=entry["id"], job=entry["job"], output=str(out) if host.trusted else host.display_name(out),
                       sha256=sha, original_sha256=orig, identical=(sha == orig) if orig and sha else None,
                       report=report.to_dict())


# ----------------------------------------------------------------------------------------------------- recipe
@dataclass
class RecipeRequest(Request):
    """The recipes recorded in a model file's metadata."""

    job = "recipe"

    model: str = param(help="model file: a path (CLI) or a name under the model folders", positional=True,
                       metavar="MODEL", model="checkpoint")
    kind: Optional[str] = param(None, help="look the name up among models of this kind only",
                                choices=("checkpoint", "vae", "lora", "controlnet"))


@dataclass
class RecipeReport(Report):
    name: str
    recipes: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        import json

        if not self.recipes:
            return f"{self.name}: no recipe in its metadata"
        return f"{self.name}:\n" + "\n".join(f"{k}: {json.dumps(v, indent=2, default=str)}"
                                              for k, v in self.recipes.items())


def run_recipe(host: Any, req: RecipeRequest, progress: Progress) -> RecipeReport:
    from ..files import open_model
    from ..history import recipes_in_metadata

    path = host.resolve_input(req.model, req.kind)
    with open_model(path) as r:
        meta = dict(r.metadata or {})
    return RecipeReport(name=host.display_name(path), recipes=recipes_in_metadata(meta))


SPECS = {
    "history": JobSpec("history", HistoryRequest, HistoryReport, run_history,
                       help="list the recorded merges, prunes and LoRA tool runs",
                       description="List the history of merges, prunes, bakes and LoRA tool runs recorded in "
                                   "each output folder (sdtoolkit-history.jsonl), newest first."),
    "history-rerun": JobSpec("history-rerun", RerunRequest, RerunReport, run_rerun,
                             help="run a recorded job again into a new file",
                             description="Run a history entry's request again, writing beside the original, and "
                                         "say whether the new file is byte-identical to it."),
    "recipe": JobSpec("recipe", RecipeRequest, RecipeReport, run_recipe,
                      help="show the recipes recorded in a model's metadata",
                      description="Show the recipes a model file carries: the WebUI merger's sd_merge_recipe / "
                                  "sd_merge_models and the toolkit's sdtoolkit_* fields."),
}

__all__ = ["HistoryRequest", "HistoryReport", "RerunRequest", "RerunReport", "RecipeRequest",
           "RecipeReport", "SPECS", "run_history", "run_rerun", "run_recipe"]
