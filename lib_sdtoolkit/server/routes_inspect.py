"""``GET /sdtoolkit/v1/inspect?path=...&kind=...``: the inspect job (the same JSON as ``inspect --json``).

The query is the job's request (:class:`lib_sdtoolkit.jobs.inspect.InspectRequest`): an unknown parameter is a
422, the name goes through the host's gate (403 outside the model folders, 404 when missing).
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query, Request

from ..host import Host

PATH = "/sdtoolkit/v1/inspect"


def register(router: APIRouter, host: Host) -> None:
    @router.get(PATH)
    def inspect_model(request: Request,
                      path: str = Query(..., description="model name or path under the model folders"),
                      kind: Optional[str] = Query(None, description="checkpoint, vae, lora or controlnet")) -> dict:
        from ..jobs import get
        from ..progress import Progress

        spec = get("inspect")
        data = {k: v for k, v in request.query_params.items()}  # unknown parameters: the request refuses them
        data["path"] = [path]
        return spec.run(host, spec.request.from_dict(data), Progress()).to_dict()
