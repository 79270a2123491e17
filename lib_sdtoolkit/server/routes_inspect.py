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

        from ..outputs import check_inside, sweep_host_temps

        resolved = host.resolve(path, kind)
        report = inspect_file(resolved)
        report.setdefault("name", host.display_name(resolved))
        try:
            check_inside(host, resolved, what="file")
            removed = sweep_host_temps(host, [resolved.parent], recursive=False)
        except Exception:  # noqa: BLE001 - a folder reached through a link that leads outside: not swept
            removed = []
        if removed:
            report["stale_temps_removed"] = [host.display_name(p) for p in removed]
        return report
