"""sd-webui-controlnet-compatible HTTP routes (at the app root, not under /sdtoolkit/v1).

``GET /controlnet/version``, ``/controlnet/model_list``, ``/controlnet/module_list``, ``/controlnet/control_types``,
``/controlnet/settings`` and ``POST /controlnet/detect`` answer with sd-webui-controlnet's response shapes
(scripts/api.py), so existing clients (``webuiapi``, scripts) work unchanged. Not registered when another ControlNet
(sd-webui-controlnet, Forge's built-in) is active: those routes are theirs.

``/controlnet/detect`` reads the upstream body field ``controlnet_input_images``; it also accepts
``controlnet_images``, the name the ``webuiapi`` client sends. Its body is upstream's, not the
``controlnet-detect`` job's request (other field names, ``controlnet_module`` defaults to ``none``, unknown fields
are ignored as upstream's FastAPI ``Body`` parameters ignore them): the route translates it into a
:class:`~lib_sdtoolkit.jobs.controlnet.DetectRequest` (checked there: NaN/Inf sliders, image count) and answers
the job's report, which is upstream's shape. ``/controlnet/model_list`` runs the ``controlnet-models`` job.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from fastapi import APIRouter, Body

from ..host import Host
from ..jobs import run as run_job

log = logging.getLogger(__name__)

API_VERSION = 3
DEFAULT_UNIT_COUNT = 3


def unit_count(host: Host) -> int:
    s = host.settings or {}
    for key in ("sdtoolkit_controlnet_unit_count", "control_net_unit_count"):
        if key in s:
            try:
                return max(1, int(s[key]))
            except (TypeError, ValueError):
                pass
    return DEFAULT_UNIT_COUNT


def model_list(host: Host, update: bool = False) -> List[str]:
    """``["None", "name [hash]", ...]``: the ``controlnet-models`` job's answer."""
    return run_job("controlnet-models", host, {"update": update}).model_list


def register(router: APIRouter, host: Host) -> None:
    from ..controlnet.compat import external_controlnet

    reason = external_controlnet(getattr(host, "settings", None))
    if reason:
        log.info("sdtoolkit: /controlnet routes not registered: %s", reason)
        return

    @router.get("/controlnet/version")
    def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/controlnet/model_list")
    def get_model_list(update: bool = True) -> dict:
        return run_job("controlnet-models", host, {"update": bool(update)}).to_dict()

    @router.get("/controlnet/module_list")
    def get_module_list(alias_names: bool = False) -> dict:
        from ..controlnet import preprocessors as P

        names = P.module_list()
        detail = P.module_detail()
        if alias_names:
            names = [P.PREPROCESSORS[n].label or n for n in names]
            detail = {(P.PREPROCESSORS[n].label or n): v for n, v in detail.items()}
        return {"module_list": names, "module_detail": detail}

    @router.get("/controlnet/control_types")
    def control_types() -> dict:
        from ..controlnet import preprocessors as P

        models = model_list(host)
        tags = sorted({t for p in P.PREPROCESSORS.values() for t in p.tags})
        out = {"All": {"module_list": P.module_list(), "model_list": models, "default_option": "none",
                       "default_model": "None"}}
        for tag in tags:
            mods = [n for n, p in P.PREPROCESSORS.items() if tag in p.tags]
            mlist = ["None"] + [m for m in models[1:] if tag.lower() in m.lower()]
            out[tag] = {"module_list": ["none"] + mods, "model_list": mlist, "default_option": mods[0],
                        "default_model": mlist[1] if len(mlist) > 1 else "None"}
        return {"control_types": out}

    @router.get("/controlnet/settings")
    def settings() -> dict:
        return {"control_net_unit_count": unit_count(host)}

    @router.post("/controlnet/detect")
    def detect(
        controlnet_module: str = Body("none"),
        controlnet_input_images: List[str] = Body([]),
        controlnet_images: Optional[List[str]] = Body(None),
        controlnet_processor_res: float = Body(-1),
        controlnet_threshold_a: float = Body(-1),
        controlnet_threshold_b: float = Body(-1),
        controlnet_masks: List[str] = Body([]),
        low_vram: bool = Body(False),
    ) -> dict:
        # upstream's body -> the job's request (the job checks it: unknown module, no image, NaN/Inf, count)
        images = list(controlnet_input_images or []) or list(controlnet_images or [])
        req = {"module": controlnet_module, "images": images, "resolution": controlnet_processor_res,
               "threshold_a": controlnet_threshold_a, "threshold_b": controlnet_threshold_b}
        return run_job("controlnet-detect", host, req).to_dict()
