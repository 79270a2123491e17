"""LoRA routes: ``GET /sdtoolkit/v1/loras`` and ``POST /sdtoolkit/v1/lora/ACTION`` for every LoRA job
(``jobs.lora.ACTIONS``: extract, bake, inspect, resize, merge), the body being the job's request (unknown fields:
422).

Inputs are names or paths under the host's model folders; ``output`` is a plain file name written into the LoRA
folder (extract, resize, merge) or the checkpoint output folder (bake). Bake takes ``loras`` as
``[{"lora": NAME, "multiplier": M}, ...]``, merge as ``[{"lora": NAME, "weight": W}, ...]``; inspect's and merge's
optional ``model`` is a checkpoint name. Errors are 4xx ``{"detail": ...}``.
"""
from __future__ import annotations

from fastapi import APIRouter

from ..host import Host
from ..jobs.faces import add_route, host_progress
from ..jobs.lora import ACTIONS

PATH = "/sdtoolkit/v1/lora"


def register(router: APIRouter, host: Host) -> None:
    @router.get("/sdtoolkit/v1/loras")
    def list_loras() -> list:
        from ..lora.registry import LoraRegistry

        reg = LoraRegistry(host.model_dirs("lora"))
        out = []
        for e in reg.entries:
            d = e.to_dict()
            d["path"] = host.display_name(e.path, "lora")
            out.append(d)
        return out

    for action, spec in ACTIONS.items():
        add_route(router, host, spec, f"{PATH}/{action}", progress=host_progress)
