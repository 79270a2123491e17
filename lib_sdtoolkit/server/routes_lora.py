"""LoRA routes: ``GET /sdtoolkit/v1/loras``, ``POST /sdtoolkit/v1/lora/extract``, ``POST /sdtoolkit/v1/lora/bake``.

Inputs are names or paths under the host's model folders (``host.resolve``); ``output`` is a plain file name written
into the LoRA folder (extract) or the checkpoint output folder (bake). Errors are 4xx ``{"detail": ...}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from fastapi import APIRouter
from pydantic import BaseModel

from ..errors import InvalidInputError
from ..host import Host
from ..validate import check_path_text


class ExtractBody(BaseModel):
    tuned: str
    base: str
    output: str
    rank: int = 32
    conv_rank: Optional[int] = None
    clamp_quantile: Optional[float] = 0.99
    device: str = "cpu"
    dtype: str = "fp16"
    overwrite: bool = False


class BakeItem(BaseModel):
    lora: str
    multiplier: float = 1.0


class BakeBody(BaseModel):
    checkpoint: str
    loras: List[BakeItem]
    output: str
    overwrite: bool = False


def _plain_name(name: str) -> str:
    check_path_text(name, "output")
    if not name or Path(name).name != name or name in (".", ".."):
        raise InvalidInputError(f"output must be a plain file name, not {name!r}")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name


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

    @router.post("/sdtoolkit/v1/lora/extract")
    def extract(body: ExtractBody) -> dict:
        from ..lora.extract import extract_lora

        tuned = host.resolve(body.tuned, "checkpoint")
        base = host.resolve(body.base, "checkpoint")
        out_dir = host.output_dir("lora")
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / _plain_name(body.output)
        tick = host.progress_callback("lora extract")
        res = extract_lora(tuned, base, out, rank=body.rank, conv_rank=body.conv_rank,
                           clamp_quantile=body.clamp_quantile, device=body.device, dtype=body.dtype,
                           overwrite=body.overwrite, progress=lambda d, t: tick(d, t))
        host.refresh("lora")
        res["name"] = host.display_name(out, "lora")
        return res

    @router.post("/sdtoolkit/v1/lora/bake")
    def bake_route(body: BakeBody) -> dict:
        from ..lora.bake import bake

        ckpt = host.resolve(body.checkpoint, "checkpoint")
        loras = [(host.resolve(i.lora, "lora"), i.multiplier) for i in body.loras]
        out_dir = host.output_dir("checkpoint")
        out = out_dir / _plain_name(body.output)
        tick = host.progress_callback("lora bake")
        res = bake(ckpt, loras, out, overwrite=body.overwrite, progress=lambda d, t: tick(d, t))
        host.refresh("checkpoint")
        res["name"] = host.display_name(out, "checkpoint")
        return res
