"""``GET /sdtoolkit/v1/inspect?path=...``: the inspect report (same JSON as ``inspect --json``)."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query

from ..host import Host

PATH = "/sdtoolkit/v1/inspect"


def register(router: APIRouter, host: Host) -> None:
    @router.get(PATH)
    def inspect_model(path: str = Query(..., description="model name or path under the model folders"),
                      kind: Optional[str] = Query(None, description="checkpoint, vae, lora or controlnet")) -> dict:
        from ..inspect import inspect_file  # imported per call: keeps the router cheap to build

        resolved = host.resolve(path, kind)
        report = inspect_file(resolved)
        report.setdefault("name", host.display_name(resolved))
        return report
