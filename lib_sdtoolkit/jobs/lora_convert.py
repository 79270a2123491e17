"""The ``lora-convert`` job: a LoRA file written under another naming (kohya, diffusers, peft, comfy), exactly.

Faces: ``python -m lib_sdtoolkit lora convert IN --to NAMING -o OUT`` (:mod:`lib_sdtoolkit.lora.cli`),
``POST /sdtoolkit/v1/lora/convert`` (:mod:`lib_sdtoolkit.server.routes_lora_convert`) and the Convert panel of the
LoRA tab (:mod:`lib_sdtoolkit.ui.lora_convert_panel`). The input goes through the host's gate as a LoRA, the output
is written into the LoRA folder (API/UI: a plain file name). No torch import here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from ..errors import InvalidInputError
from ..progress import Progress
from .base import JobSpec, Report, Request, param

#: the namings a LoRA can be written in (``lora.convert.NAMINGS``)
NAMINGS = ("kohya", "diffusers", "peft", "comfy")
_OTHER_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")


@dataclass
class ConvertRequest(Request):
    """Write a LoRA under another naming; the tensors are copied bit for bit (Flux's fused q/k/v split or joined
    exactly)."""

    job = "lora-convert"

    lora: str = param(help="the LoRA file to convert (its naming is detected)", model="lora", positional=True,
                      metavar="IN")
    to: str = param(help="the naming to write", choices=NAMINGS)
    output: str = param(help="the LoRA to write (.safetensors); API/UI: a file name in the LoRA folder", short="-o")
    overwrite: bool = param(False, help="replace an existing output")


@dataclass
class ConvertReport(Report):
    """What ``lora.convert.convert`` answers, plus ``name`` (the new LoRA's name in the host's list)."""

    output: str
    arch: str
    source_naming: str
    naming: str
    modules_in: int
    modules_out: int
    tensors: int
    name: str

    def summary(self) -> str:
        return (f"Wrote {self.name}: {self.arch} LoRA, {self.source_naming} -> {self.naming}, "
                f"{self.modules_in} modules in, {self.modules_out} out ({self.tensors} tensors)\nOutput: {self.output}")


def run_convert(host: Any, req: ConvertRequest, progress: Progress) -> ConvertReport:
    from ..lora.convert import convert

    src = host.resolve_input(req.lora, "lora")
    raw = str(req.output or "").strip()
    if raw.lower().endswith(_OTHER_SUFFIXES):
        raise InvalidInputError(f"the output is written as .safetensors, not {raw.rsplit('.', 1)[-1]}", path=raw)
    out = host.resolve_output(req.output, "lora", suffixes=(".safetensors",), add_suffix=".safetensors",
                              plain=not host.trusted)
    res = convert(src, out, req.to, overwrite=req.overwrite, progress=progress.phase("converting"))
    host.refresh("lora")
    return ConvertReport(name=host.display_name(out, "lora"), **res)


SPEC = JobSpec("lora-convert", ConvertRequest, ConvertReport, run_convert,
               help="write a LoRA under another naming (kohya, diffusers, peft, comfy)",
               description="Write IN under another naming: kohya (lora_unet_/lora_te*), diffusers (unet./"
                           "transformer./text_encoder. + lora_A/lora_B), peft (the same under base_model.model.) or "
                           "comfy (diffusion_model. + checkpoint names). SD1, SDXL and Flux.1; the naming of IN is "
                           "detected; tensors are copied bit for bit.")
#: the action name under ``lora`` (CLI sub-command, route path part)
ACTIONS: Dict[str, JobSpec] = {"convert": SPEC}

__all__ = ["SPEC", "ACTIONS", "NAMINGS", "ConvertRequest", "ConvertReport", "run_convert"]
