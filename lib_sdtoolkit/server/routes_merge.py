"""``POST /sdtoolkit/v1/merge``: run a checkpoint merge; the JSON body mirrors ``MergeRecipe``.

Body: ``model_a``, ``model_b``, ``model_c`` (names or paths under the checkpoint folders), ``method``, ``alpha``,
``beta``, ``blocks`` / ``blocks_beta`` (list or comma string), ``base_alpha``, ``preset``, ``dtype``, ``keep_ema``,
``fix_position_ids``, ``bake_vae`` (a VAE name), ``discard``, ``seed``, ``allow_extrapolation``, ``device``,
``save_metadata``, plus ``output`` (a plain file name written into the checkpoint output folder) and ``overwrite``.
Answers the merge report (``name`` is the new checkpoint's name); errors are 4xx ``{"detail": ...}``.
``GET /sdtoolkit/v1/merge/presets`` lists the block presets.

Merge in memory (faces that hold a model: the WebUI): ``"in_memory": true`` merges into the loaded model and writes
no file (the report has ``in_memory: true`` and the merged model's ``name``/``title``/``sha256``);
``POST /sdtoolkit/v1/merge/save-current`` (``output``, ``overwrite``) writes that merge to the checkpoint folder,
byte-identical to a merge of the same recipe to a file; ``POST /sdtoolkit/v1/merge/restore-loaded`` reloads the
checkpoint that was loaded before; ``GET /sdtoolkit/v1/merge/current`` tells what is loaded.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel

from ..host import Host
from ..validate import check_device

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
    in_memory: bool = False


class SaveCurrentBody(BaseModel):
    output: Optional[str] = None
    overwrite: bool = False


def _dump(body: BaseModel) -> Dict[str, Any]:
    return body.model_dump() if hasattr(body, "model_dump") else body.dict()


def register(router: APIRouter, host: Host) -> None:
    @router.post(PATH)
    def merge(body: MergeBody) -> dict:
        from ..merge.service import merge_for_host  # imported per call: keeps the router cheap to build

        body.device = check_device(body.device)
        return merge_for_host(host, _dump(body))

    @router.get(PATH + "/presets")
    def presets() -> dict:
        from ..merge.presets import PRESETS

        return {"presets": {k: {"base": b, "blocks": v} for k, (b, v) in PRESETS.items()}}

    @router.post(PATH + "/save-current")
    def save_current(body: Optional[SaveCurrentBody] = None) -> dict:
        from ..merge.live import save_current_merge_for_host

        return save_current_merge_for_host(host, _dump(body) if body is not None else {})

    @router.post(PATH + "/restore-loaded")
    def restore_loaded() -> dict:
        from ..merge.live import restore_loaded_model_for_host

        return restore_loaded_model_for_host(host)

    @router.get(PATH + "/current")
    def current() -> dict:
        from ..merge.live import current_merge

        supported = host.has_loaded_model_support
        model = host.loaded_model() if supported else None
        rec = current_merge(host, model) if model is not None else None
        f = host.loaded_model_file(model) if model is not None else None
        return {"supported": supported, "loaded": model is not None,
                "loaded_file": host.display_name(f, "checkpoint") if f else None,
                "current_merge": rec.to_dict() if rec is not None else None}
