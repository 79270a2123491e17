"""``POST /sdtoolkit/v1/merge``: run a checkpoint merge; the JSON body mirrors ``MergeRecipe``.

Body: ``model_a``, ``model_b``, ``model_c`` (names or paths under the checkpoint folders), ``method``, ``alpha``,
``beta``, ``blocks`` / ``blocks_beta`` (list or comma string), ``base_alpha``, ``preset``, ``dtype``, ``keep_ema``,
``fix_position_ids``, ``bake_vae`` (a VAE name), ``discard``, ``seed``, ``allow_extrapolation``, ``device``,
``save_metadata``, plus ``output`` (a plain file name written into the checkpoint output folder) and ``overwrite``.
Answers the merge report (``name`` is the new checkpoint's name); errors are 4xx ``{"detail": ...}``.
``GET /sdtoolkit/v1/merge/presets`` lists the block presets.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel

from ..host import Host

PATH = "/sdtoolkit/v1/merge"


class MergeBody(BaseModel):
    model_a: str
    model_b: Optional[str] = None
    model_c: Optional[str] = None
    method: str = "weighted_sum"
    alpha: float = 0.5
    beta: Optional[float] = None
    blocks: Optional[Union[str, List[float]]] = None
    blocks_beta: Optional[Union[str, List[float]]] = None
    base_alpha: Optional[float] = None
    preset: Optional[str] = None
    dtype: str = "fp16"
    keep_ema: bool = False
    fix_position_ids: bool = False
    bake_vae: Optional[str] = None
    discard: Optional[str] = None
    seed: int = 0
    allow_extrapolation: bool = False
    device: str = "cpu"
    save_metadata: bool = True
    output: Optional[str] = None
    overwrite: bool = False


def _dump(body: BaseModel) -> Dict[str, Any]:
    return body.model_dump() if hasattr(body, "model_dump") else body.dict()


def register(router: APIRouter, host: Host) -> None:
    @router.post(PATH)
    def merge(body: MergeBody) -> dict:
        from ..merge.service import merge_for_host  # imported per call: keeps the router cheap to build

        return merge_for_host(host, _dump(body))

    @router.get(PATH + "/presets")
    def presets() -> dict:
        from ..merge.presets import PRESETS

        return {"presets": {k: {"base": b, "blocks": v} for k, (b, v) in PRESETS.items()}}
