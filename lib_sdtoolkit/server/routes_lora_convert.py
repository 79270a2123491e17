"""``POST /sdtoolkit/v1/lora/convert``: the ``lora-convert`` job (body = its request; unknown fields: 422)."""
from __future__ import annotations

from fastapi import APIRouter

from ..host import Host
from ..jobs.faces import add_route, host_progress
from ..jobs.lora_convert import SPEC

PATH = "/sdtoolkit/v1/lora/convert"


def register(router: APIRouter, host: Host) -> None:
    add_route(router, host, SPEC, PATH, progress=host_progress)
