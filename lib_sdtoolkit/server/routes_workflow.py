"""``POST /sdtoolkit/v1/compare``, ``/sdtoolkit/v1/history``, ``/sdtoolkit/v1/history/rerun``,
``/sdtoolkit/v1/recipe``: model similarity and the recipe history.

The bodies are the jobs' requests (:mod:`lib_sdtoolkit.jobs.compare`, :mod:`lib_sdtoolkit.jobs.history`; an unknown
field is a 422); model names and folders go through the host's gate (403 outside the model folders, 404 missing).

* compare: ``models`` (2-8 names), ``kind``. Answers ``names``, ``groups`` and per pair and group ``cosine``,
  ``rel_l2``, ``equal``, ``keys``, plus ``overall``.
* history: ``folders`` (default: every model folder), ``job_name``, ``limit``. Answers ``entries`` newest first.
* history/rerun: ``entry`` (id), ``output`` (a file name beside the original), ``overwrite``, ``folders``.
  Answers the new file, its sha256 and ``identical`` (to the original).
* recipe: ``model``, ``kind``. Answers ``recipes`` (``sd_merge_recipe``, ``sd_merge_models``, ``sdtoolkit_*``).
"""
from __future__ import annotations

from fastapi import APIRouter

from ..host import Host
from ..jobs import get as get_job
from ..jobs.faces import add_route, host_progress

PREFIX = "/sdtoolkit/v1"


def register(router: APIRouter, host: Host) -> None:
    add_route(router, host, get_job("compare"), f"{PREFIX}/compare", progress=host_progress)
    add_route(router, host, get_job("history"), f"{PREFIX}/history", optional_body=True)
    add_route(router, host, get_job("history-rerun"), f"{PREFIX}/history/rerun", progress=host_progress)
    add_route(router, host, get_job("recipe"), f"{PREFIX}/recipe")
