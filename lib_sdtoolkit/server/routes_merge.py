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

from fastapi import APIRouter

from ..host import Host
from ..jobs import get as get_job
from ..jobs.faces import add_route

PATH = "/sdtoolkit/v1/merge"


def register(router: APIRouter, host: Host) -> None:
    add_route(router, host, get_job("merge"), PATH)
    add_route(router, host, get_job("merge-save-current"), PATH + "/save-current", optional_body=True)
    add_route(router, host, get_job("merge-restore"), PATH + "/restore-loaded", optional_body=True)

    @router.get(PATH + "/presets")
    def presets() -> dict:
        from ..merge.presets import PRESETS

        return {"presets": {k: {"base": b, "blocks": v} for k, (b, v) in PRESETS.items()}}

    @router.get(PATH + "/current")
    def current() -> dict:
        from ..merge.live import current_merge

        supported = host.has_loaded_model_support
        model = host.loaded_model() if supported else None
        rec = current_merge(host.model_hooks, model) if model is not None else None
        f = host.loaded_model_file(model) if model is not None else None
        return {"supported": supported, "loaded": model is not None,
                "loaded_file": host.display_name(f, "checkpoint") if f else None,
                "current_merge": rec.to_dict() if rec is not None else None}
