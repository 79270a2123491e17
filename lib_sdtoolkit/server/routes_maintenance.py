"""``POST /sdtoolkit/v1/prune``, ``/sdtoolkit/v1/hash``, ``/sdtoolkit/v1/dedup``.

Every path in a body goes through the host: model files through ``host.resolve`` (names or paths under the model
folders; ``..`` and absolute paths elsewhere answer 403), outputs and folders through ``prune.resolve_output`` /
``Host.resolve_folders`` (same rule).

* prune: ``path``, ``kind``, ``output`` (a file name, written into the folder of the input's kind, or the VAE
  folder for ``only: ["vae"]``), ``dtype`` (fp16|bf16|fp32|keep), ``keep_ema``, ``keep_junk``,
  ``fix_position_ids``, ``only`` (list or comma string), ``bare``, ``overwrite``. Answers the prune result.
* hash: ``paths`` (list), ``kind``, ``algos`` (default all). Answers ``results`` (sha256, autov2, autov1, autov3,
  blake3, crc32, civitai names), ``problems``, ``webui_cache_entries``.
* dedup: ``kind`` (vae|checkpoint|lora|controlnet|any), ``folders`` (default: the kind's model folders),
  ``action`` (report|hardlink|move), ``to`` (move target under the model folders), ``confirm`` (true, required by
  hardlink and move). Answers groups, gain, problems, actions and a ready-made table.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel

from ..host import Host

PREFIX = "/sdtoolkit/v1"


class PruneBody(BaseModel):
    path: str
    kind: Optional[str] = None
    output: str
    dtype: str = "fp16"
    keep_ema: bool = False
    keep_junk: bool = False
    fix_position_ids: bool = False
    only: Optional[Union[str, List[str]]] = None
    bare: Optional[bool] = None
    overwrite: bool = False


class HashBody(BaseModel):
    paths: List[str]
    kind: Optional[str] = None
    algos: Optional[List[str]] = None


class DedupBody(BaseModel):
    kind: str = "any"
    folders: Optional[List[str]] = None
    action: str = "report"
    to: Optional[str] = None
    confirm: bool = False


def _dump(body: BaseModel) -> Dict[str, Any]:
    return body.model_dump() if hasattr(body, "model_dump") else body.dict()


def register(router: APIRouter, host: Host) -> None:
    @router.post(PREFIX + "/prune")
    def prune(body: PruneBody) -> dict:
        from ..prune import prune_for_host  # imported per call: keeps the router cheap to build

        return prune_for_host(host, _dump(body))

    @router.post(PREFIX + "/hash")
    def hash_files(body: HashBody) -> dict:
        from ..dedup import hash_for_host

        return hash_for_host(host, body.paths, body.kind, body.algos)

    @router.post(PREFIX + "/dedup")
    def dedup(body: DedupBody) -> dict:
        from ..dedup import dedup_for_host

        return dedup_for_host(host, _dump(body))
