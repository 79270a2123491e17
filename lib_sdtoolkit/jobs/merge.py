"""Merge jobs: to a file, into the loaded model, save the current in-memory merge, restore the loaded model.

The request is declared here once; ``python -m lib_sdtoolkit merge``, ``POST /sdtoolkit/v1/merge`` and the Merge
tab are derived from it (:mod:`lib_sdtoolkit.jobs.faces`). Names of models are resolved through the host's gate
(``resolve_input``), the output through ``resolve_output``; the engine below sees paths only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import InvalidInputError
from ..merge import methods as _merge_methods  # torch-free: the declarations only
from ..progress import Progress
from ._record import hash_cache
from .base import JobSpec, Report, Request, param

OUTPUT_SUFFIXES = (".safetensors", ".ckpt")
#: output dtypes (the names of ``merge.recipe.DTYPES``; kept here torch-free for the CLI's --help)
MERGE_DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2")


def _method_names():
    return _merge_methods.names()


@dataclass
class MergeRequest(Request):
    """A merge of two or three checkpoints (the fields of ``MergeRecipe`` plus where the result goes)."""

    job = "merge"

    model_a: str = param(help="model A (the base)", model="checkpoint", positional=True, metavar="A")
    model_b: Optional[str] = param(None, help="model B", model="checkpoint", positional=True, metavar="B")
    model_c: Optional[str] = param(None, help="model C (add_difference, sum_twice, triple_sum, ties, dare)",
                                   model="checkpoint", positional=True, metavar="C")
    method: str = param("weighted_sum", help="merge method (see the methods below)", choices=_method_names)
    alpha: float = param(0.5, help="M, the share of B: weighted_sum = A*(1-M) + B*M; add_difference = A + (B-C)*M")
    beta: Optional[float] = param(None, help=_merge_methods.beta_help)  # asked when shown: the registry may grow
    blocks: Optional[Union[str, List[float]]] = param(
        None, help='per-block M: "v1,...,v25" (SD1/SD2; 26 with BASE first), 19/20 values (SDXL) or 57/58 '
                   '(Flux.1: D00..D18, S00..S37)')
    blocks_beta: Optional[Union[str, List[float]]] = param(None, help="per-block beta, same form as blocks")
    base_alpha: Optional[float] = param(None, help="M for keys outside the UNet when using blocks")
    preset: Optional[str] = param(None, help="a named MBW preset (GRAD_V, FLAT_25, WRAP08, ...); on Flux.1 its 25 "
                                             "values are stretched over the 57 blocks (D00 = IN00, S09 = M00, "
                                             "S37 = OUT11, linear in between)")
    dtype: str = param("fp16", help="output dtype (fp8: as Flux is shared; maths is float32 in every case)",
                       choices=MERGE_DTYPES)
    keep_ema: bool = param(False, help="keep model_ema.* keys (dropped by default)")
    fix_position_ids: bool = param(False, help="write CLIP position_ids as arange(77) int64 (default: kept from A)")
    bake_vae: Optional[str] = param(None, help="replace first_stage_model.* from this VAE", model="vae",
                                    metavar="VAE")
    discard: Optional[str] = param(None, help="leave out keys matching this regex", metavar="REGEX")
    seed: int = param(0, help="seed for dare")
    allow_extrapolation: bool = param(False, help="allow ratios outside [0, 1]")
    device: Optional[str] = param(None, help="cpu, cuda, cuda:N (default: the host's device: --sdtoolkit-device "
                                             "in the WebUI, $SDTOOLKIT_DEVICE or cpu elsewhere)")
    save_metadata: bool = param(True, help="hash the inputs and record the recipe in the metadata",
                                negate="--no-metadata")
    output: Optional[str] = param(None, help="output file (.safetensors or .ckpt); API/UI: a file name in the "
                                             "checkpoint folder (default: named after the inputs)",
                                  flag="--output", short="-o")
    overwrite: bool = param(False, help="replace an existing output")
    custom_name: Optional[str] = param(None, help="the name the metadata records (the WebUI's custom_name; "
                                                  "default: the output file's name)", metavar="NAME")
    in_memory: bool = param(False, help="merge into the loaded model instead of writing a file (WebUI)", cli=False)
    workers: Optional[int] = param(None, help="worker threads (default 2)", minimum=1, maximum=64, api=False)

    def recipe_fields(self) -> Dict[str, Any]:
        skip = {"output", "overwrite", "in_memory", "workers", "custom_name"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def check(self) -> None:
        if self.device is not None:
            from ..validate import check_device

            self.device = check_device(self.device)
        if not self.model_a or not str(self.model_a).strip():
            raise InvalidInputError("merge: pick model A")
        if not self.model_b:
            raise InvalidInputError("merge: pick model B (a merge takes 2 or 3 models)")


@dataclass
class MergeJobReport(Report):
    """The engine's report plus where the result went. ``to_dict`` keeps the engine's fields at the top level
    (what the API has always answered) and adds ``name`` (the new checkpoint's name in the host's list)."""

    name: str
    in_memory: bool = False
    title: Optional[str] = None
    sha256: Optional[str] = None
    original_file: Optional[str] = None
    _engine: Any = None

    def to_dict(self) -> Dict[str, Any]:
        d = self._engine.to_dict() if self._engine is not None else {}
        d["name"] = self.name
        if self.in_memory:
            d.update(in_memory=True, output=None, title=self.title, sha256=self.sha256,
                     original_file=self.original_file)
        return d

    def summary(self) -> str:
        text = self._engine.summary() if self._engine is not None else ""
        if self.in_memory:
            text += f"\nMerged into the loaded model as {self.title}"
        return text


def _recipe(host: Any, req: MergeRequest):
    """The engine's recipe with every model name resolved through the host's gate (403/404 before any work)."""
    from ..merge.recipe import MergeRecipe

    fields = req.recipe_fields()
    fields["device"] = host.compute_device(req.device)
    recipe = MergeRecipe.from_dict(fields)
    a = str(host.resolve_input(recipe.model_a, "checkpoint"))
    b = str(host.resolve_input(recipe.model_b, "checkpoint")) if recipe.model_b else None
    c = str(host.resolve_input(recipe.model_c, "checkpoint")) if recipe.model_c else None
    vae = str(host.resolve_input(recipe.bake_vae, "vae")) if recipe.bake_vae else None
    recipe = recipe.with_models(a, b, c, vae)
    recipe.validate()
    return recipe


def display_names(host: Any, recipe: Any) -> Dict[str, str]:
    names = {"A": host.display_name(recipe.model_a, "checkpoint"),
             "B": host.display_name(recipe.model_b, "checkpoint") if recipe.model_b else None,
             "C": host.display_name(recipe.model_c, "checkpoint") if recipe.model_c else None,
             "VAE": host.display_name(recipe.bake_vae, "vae") if recipe.bake_vae else None}
    return {k: v for k, v in names.items() if v}


def default_output_name(recipe: Any) -> str:
    """``A_B[_C]_method_tag.safetensors``; the tag is the preset, else the block list's digest, else alpha, so
    two merges that differ only in blocks / preset never collide."""
    stem = lambda p: Path(p).stem if p else ""  # noqa: E731
    parts = [stem(recipe.model_a), stem(recipe.model_b)] + ([stem(recipe.model_c)] if recipe.model_c else [])
    if recipe.preset:
        tag = recipe.preset
    elif recipe.block_weighted:
        import hashlib

        blocks = recipe.blocks if isinstance(recipe.blocks, str) else ",".join(f"{float(v):g}" for v in recipe.blocks)
        tag = "mbw" + hashlib.sha256(blocks.replace(" ", "").encode()).hexdigest()[:8]
    else:
        tag = f"{recipe.alpha:g}"
    return f"{'_'.join(parts)}_{recipe.method}_{tag}.safetensors"


def run(host: Any, req: MergeRequest, progress: Progress) -> MergeJobReport:
    """Merge to a file (or, with ``in_memory``, into the host's loaded model)."""
    if req.in_memory:
        return run_in_memory(host, req, progress)
    from ..merge.engine import merge_files

    recipe = _recipe(host, req)
    out = host.resolve_output(req.output, "checkpoint", suffixes=OUTPUT_SUFFIXES, add_suffix=".safetensors",
                              plain=not host.trusted, default=default_output_name(recipe))
    with hash_cache(host) as cache:
        report = merge_files(recipe, out, overwrite=req.overwrite, progress=progress.counter("merging"),
                             workers=req.workers, names=display_names(host, recipe), cancel=progress.cancel_event,
                             hash_cache=cache, hash_progress=progress.counter("hashing inputs"),
                             custom_name=req.custom_name)
    host.refresh("checkpoint")
    return MergeJobReport(name=host.display_name(out, "checkpoint"), _engine=report)


def run_in_memory(host: Any, req: MergeRequest, progress: Progress) -> MergeJobReport:
    from ..merge.live import merge_into_loaded

    recipe = _recipe(host, req)
    with hash_cache(host) as cache:
        rec = merge_into_loaded(host.model_hooks, recipe, display_names(host, recipe),
                                Path(default_output_name(recipe)).stem, progress=progress.counter("merging"),
                                hash_cache=cache,
                                hash_progress=progress.counter("hashing inputs"))
    return MergeJobReport(name=rec.name, in_memory=True, title=rec.title, sha256=rec.sha256,
                          original_file=rec.original_file, _engine=rec.report)


@dataclass
class SaveCurrentRequest(Request):
    """Write the loaded model's in-memory merge to the checkpoint folder (byte-identical to a merge to a file)."""

    job = "merge-save-current"

    output: Optional[str] = param(None, help="a file name in the checkpoint folder (default: the merge's name)")
    overwrite: bool = param(False, help="replace an existing output")


def run_save_current(host: Any, req: SaveCurrentRequest, progress: Progress) -> MergeJobReport:
    from ..merge.engine import merge_files
    from ..merge.live import current_merge_checked

    rec = current_merge_checked(host.model_hooks)
    out = host.resolve_output(req.output, "checkpoint", suffixes=OUTPUT_SUFFIXES, add_suffix=".safetensors",
                              plain=not host.trusted, default=rec.name + ".safetensors")
    with hash_cache(host) as cache:
        report = merge_files(rec.recipe, out, overwrite=req.overwrite, progress=progress.counter("merging"),
                             names=rec.names, cancel=progress.cancel_event, hash_cache=cache,
                             hash_progress=progress.counter("hashing inputs"))
    host.refresh("checkpoint")
    return MergeJobReport(name=host.display_name(out, "checkpoint"), _engine=report)


@dataclass
class RestoreRequest(Request):
    """Reload the checkpoint that was loaded before the in-memory merge."""

    job = "merge-restore"


@dataclass
class RestoreReport(Report):
    restored: str
    path: str

    def summary(self) -> str:
        return f"Restored {self.restored}"


def run_restore(host: Any, req: RestoreRequest, progress: Progress) -> RestoreReport:
    from ..merge.live import restore_loaded_model

    path = restore_loaded_model(host.model_hooks)
    return RestoreReport(restored=host.display_name(path, "checkpoint"), path=str(path))


SPECS = {
    "merge": JobSpec("merge", MergeRequest, MergeJobReport, run,
                     help="merge checkpoints (weighted sum, add difference, block weighted, TIES, DARE)",
                     description="Merge two or three checkpoints, streaming key by key (peak memory: a few "
                                 "tensors). M (--alpha) is the share of B: weighted_sum = A*(1-M) + B*M; "
                                 "add_difference = A + (B-C)*M."),
    "merge-in-memory": JobSpec("merge-in-memory", MergeRequest, MergeJobReport, run_in_memory,
                               help="merge into the loaded model (no file)"),
    "merge-save-current": JobSpec("merge-save-current", SaveCurrentRequest, MergeJobReport, run_save_current,
                                  help="write the current in-memory merge to a file"),
    "merge-restore": JobSpec("merge-restore", RestoreRequest, RestoreReport, run_restore,
                             help="reload the checkpoint loaded before the in-memory merge"),
}

__all__ = ["MergeRequest", "MergeJobReport", "SaveCurrentRequest", "RestoreRequest", "RestoreReport", "SPECS",
           "default_output_name", "display_names", "run", "run_in_memory", "run_save_current", "run_restore"]
