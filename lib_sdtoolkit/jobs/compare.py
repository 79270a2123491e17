"""Compare job: per-block similarity of two or more models (:mod:`lib_sdtoolkit.compare`).

``python -m lib_sdtoolkit compare A B [C ...] [--kind KIND] [--json]``, ``POST /sdtoolkit/v1/compare`` and the
Compare tab are derived from :class:`CompareRequest`. Names go through the host's gate (``resolve_input``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import InvalidInputError
from ..progress import Progress
from .base import JobSpec, Report, Request, param

KINDS = ("checkpoint", "vae")


@dataclass
class CompareRequest(Request):
    """Two or more models of one architecture (a VAE file may be compared with a checkpoint's VAE)."""

    job = "compare"

    models: List[str] = param(help="two or more model files: paths (CLI) or names under the model folders",
                              positional=True, metavar="MODEL", model="checkpoint")
    kind: Optional[str] = param(None, help="look the names up among models of this kind only (default: every "
                                           "kind)", choices=KINDS)

    def check(self) -> None:
        if len(self.models or []) > 8:
            raise InvalidInputError("compare: at most 8 models at once (28 pairs)")


@dataclass
class CompareReport(Report):
    """``files``/``names``: the models; ``groups``: the merge blocks and components compared, in order; ``pairs``:
    per pair ``a``, ``b`` (indices), per group ``cosine``, ``rel_l2``, ``equal``, ``keys``, and ``overall``."""

    names: List[str]
    result: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"names": list(self.names), **self.result}

    def summary(self) -> str:
        from ..compare import format_table

        return format_table(self.result, self.names)


def run(host: Any, req: CompareRequest, progress: Progress) -> CompareReport:
    from ..compare import compare_files

    files = [host.resolve_input(n, req.kind) for n in req.models or []]  # 403 / 404 before anything is read
    if len(files) < 2:
        raise InvalidInputError("compare: name two or more models")
    result = compare_files(files, progress=progress.counter("comparing"), check=progress.check)
    names = [host.display_name(f) for f in files]
    d = result.to_dict()
    if not host.trusted:
        d["files"] = list(names)
    return CompareReport(names=names, result=d)


SPEC = JobSpec("compare", CompareRequest, CompareReport, run,
               help="how related models are, block by block (cosine similarity, relative L2)",
               description="Compare two or more models of one architecture, streaming: per merge block (BASE, "
                           "IN00..OUT11 / Flux's blocks) and per component (text encoders, VAE), the cosine "
                           "similarity and relative L2 difference |A-B|/|A| of the weights, and whether they are "
                           "identical. Several models: the pairwise matrix.")

__all__ = ["CompareRequest", "CompareReport", "SPEC", "run"]
