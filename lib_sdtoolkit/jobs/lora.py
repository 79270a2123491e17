"""LoRA file jobs: extract a LoRA from two checkpoints, bake LoRAs into a checkpoint, inspect (and explain) a LoRA
file, resize a LoRA, merge LoRAs.

Each action is one request / report / run triple listed in :data:`ACTIONS`; every face derives from that table:
``python -m lib_sdtoolkit lora ACTION`` (:mod:`lib_sdtoolkit.lora.cli`), ``POST /sdtoolkit/v1/lora/ACTION``
(:mod:`lib_sdtoolkit.server.routes_lora`) and the LoRA tools tab (:mod:`lib_sdtoolkit.ui.lora_tab`). A new action
(resize, merge, convert) is a new triple and one line in :data:`ACTIONS` (plus its name in ``JOB_MODULES`` and a
section of the tab).

Names of models go through the host's gate (``resolve_input``), outputs through ``resolve_output``; the features
below (:mod:`lib_sdtoolkit.lora.extract`, :mod:`~lib_sdtoolkit.lora.bake`, :mod:`~lib_sdtoolkit.lora.inspect_lora`)
see paths and a progress callable only. No torch import here: the CLI's ``--help`` stays torch-free.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import InvalidInputError
from ..progress import Progress
from .base import JobSpec, Report, Request, _coerce_simple, param

#: dtypes a LoRA can be written in (``lora.extract.DTYPES`` maps them to torch dtypes)
DTYPES = ("fp16", "bf16", "fp32")
OUTPUT_SUFFIXES = (".safetensors",)
OTHER_MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")


def _output(host: Any, name: Optional[str], kind: str) -> Any:
    """Where a LoRA job writes: through the host's gate (API/UI: a plain file name in the ``kind`` folder). A name
    without a suffix gets ``.safetensors``; another model suffix is refused (``x.ckpt`` never becomes
    ``x.ckpt.safetensors``)."""
    raw = str(name if name is not None else "").strip()
    if raw.lower().endswith(OTHER_MODEL_SUFFIXES):
        raise InvalidInputError(f"the output is written as .safetensors, not {raw.rsplit('.', 1)[-1]}", path=raw)
    return host.resolve_output(name, kind, suffixes=OUTPUT_SUFFIXES, add_suffix=".safetensors",
                               plain=not host.trusted)


def _check_device(device: str) -> str:
    from ..validate import check_device

    return check_device(device)


# ------------------------------------------------------------------------------------------------- extract
@dataclass
class ExtractRequest(Request):
    """Extract a LoRA from the difference ``tuned - base`` by truncated SVD, layer by layer."""

    job = "lora-extract"

    tuned: str = param(help="the fine-tuned checkpoint", model="checkpoint", positional=True, metavar="TUNED")
    base: str = param(help="the checkpoint it was tuned from", model="checkpoint", positional=True, metavar="BASE")
    output: str = param(help="the LoRA to write (.safetensors); API/UI: a file name in the LoRA folder",
                        short="-o")
    rank: int = param(32, help="rank of the attention / text-encoder layers", minimum=1)
    conv_rank: Optional[int] = param(None, help="also extract ResNet and up/down-sampler layers at this rank (LoCon)",
                                     minimum=1)
    clamp_quantile: Optional[float] = param(None, help="clamp the factors at this quantile of their magnitudes "
                                                        "(kohya uses 0.99; lossy); default and 1: off",
                                            minimum=0.0, maximum=1.0)
    device: str = param("cpu", help="cpu or cuda")
    dtype: str = param("fp16", help="dtype of the written factors", choices=DTYPES)
    overwrite: bool = param(False, help="replace an existing output")
    rank_mode: str = param("fixed", help="fixed: every layer at --rank; energy: per layer the smallest rank "
                                         "keeping --energy of its ‖ΔW‖² (--rank is the cap)",
                           choices=("fixed", "energy"))
    energy: float = param(0.95, help="with --rank-mode energy: the fraction of each layer's energy to keep",
                          minimum=0.0, maximum=1.0)
    svd: str = param("auto", help="auto: randomised SVD for large layers, full SVD for small ones",
                     choices=("auto", "full", "randomized"))

    def check(self) -> None:
        self.device = _check_device(self.device)
        if self.energy <= 0:
            raise InvalidInputError(f"{self.job}: energy must be > 0")


@dataclass
class ExtractReport(Report):
    """What ``extract_lora`` answers, plus ``name`` (the new LoRA's name in the host's list)."""

    output: str
    arch: str
    layers: int
    skipped_identical: int
    rank: int
    conv_rank: Optional[int]
    rank_mode: str
    energy: Optional[float]
    clamp_quantile: Optional[float]
    min_energy: float
    layer_report: List[Dict[str, Any]]
    name: str
    #: Flux control model against its base: {"widened": {module: {"from", "to"}}, "set_layers": n}; the LoRA is
    #: written in BFL's control layout
    control: Optional[Dict[str, Any]] = None

    def summary(self) -> str:
        ranks = f"rank {self.rank}" + (f", conv rank {self.conv_rank}" if self.conv_rank else "")
        if self.rank_mode == "energy":
            ranks = f"energy {self.energy:g}, at most " + ranks
        text = f"Wrote {self.name}: {self.layers} {self.arch} layers ({ranks})"
        if self.skipped_identical:
            text += f"; {self.skipped_identical} identical layers skipped"
        if self.control:
            wide = ", ".join(f"{m} {v['from'][1]} -> {v['to'][1]} input channels"
                             for m, v in self.control["widened"].items())
            text += (f"\nA control model against its base: written as a BFL control LoRA ({wide}; "
                     f"{self.control['set_layers']} qk-norm scales set)")
        return text + f"\n{energy_lines(self.layer_report)}\nOutput: {self.output}"


def energy_lines(layers: List[Dict[str, Any]], worst: int = 5) -> str:
    """Kept energy: the minimum and mean, and the ``worst`` layers (the CLI's text; --json has every layer)."""
    if not layers:
        return "Kept energy: -"
    e = [float(x["energy"]) for x in layers]
    lines = [f"Kept energy: min {min(e):.4%}, mean {sum(e) / len(e):.4%} over {len(e)} layers"]
    for x in sorted(layers, key=lambda x: x["energy"])[:worst]:
        if x["energy"] < 0.999999:
            lines.append(f"  {x['energy']:.4%}  rank {x['rank']:<4} {x['name']}")
    return "\n".join(lines)


def run_extract(host: Any, req: ExtractRequest, progress: Progress) -> ExtractReport:
    from ..lora.extract import extract_lora

    tuned = host.resolve_input(req.tuned, "checkpoint")
    base = host.resolve_input(req.base, "checkpoint")
    out = _output(host, req.output, "lora")
    res = extract_lora(tuned, base, out, rank=req.rank, conv_rank=req.conv_rank, clamp_quantile=req.clamp_quantile,
                       device=req.device, dtype=req.dtype, overwrite=req.overwrite,
                       progress=progress.phase("extracting"), rank_mode=req.rank_mode, energy=req.energy,
                       svd=req.svd)
    host.refresh("lora")
    return ExtractReport(name=host.display_name(out, "lora"), **res)


# ------------------------------------------------------------------------------------------------- bake
def parse_lora_arg(spec: str) -> Tuple[str, float]:
    """``name[:mult]`` -> (name, mult); a trailing ``:number`` is the multiplier (default 1)."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


#: the block-weight suffix of a bake entry: ``NAME:MULT:lbw=SPEC`` (as in ``<lora:NAME:MULT:lbw=SPEC>``)
LBW_SUFFIX = ":lbw="


def _bake_item(item: Any, i: int, where: str, lbw: bool = True) -> Dict[str, Any]:
    """One ``loras`` entry as ``{"lora": name, "multiplier": m}`` (plus ``"lbw"`` when given): from
    ``"NAME[:MULT][:lbw=SPEC]"`` (CLI, tab) or from ``{"lora": NAME, "multiplier": M, "lbw": SPEC}`` (API);
    anything else is a 422 naming the entry. ``lbw=False``: block weights are refused (LoRA merge)."""
    field = f"loras[{i}]"
    known = ("lora", "multiplier", "lbw") if lbw else ("lora", "multiplier")
    spec: Optional[str] = None
    if isinstance(item, str):
        text = item.strip()
        cut = text.find(LBW_SUFFIX)
        if cut >= 0:
            text, spec = text[:cut], text[cut + len(LBW_SUFFIX):].strip()
        name, mult = parse_lora_arg(text)
    elif isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in known)
        if unknown:
            raise InvalidInputError(f"{where}: {field} has unknown field(s): {', '.join(unknown)} "
                                    f"(known: {', '.join(known)})")
        if "lora" not in item:
            raise InvalidInputError(f"{where}: {field}.lora is required")
        name = _coerce_simple(str, item["lora"], field + ".lora", where)
        mult = _coerce_simple(float, item.get("multiplier", 1.0), field + ".multiplier", where)
        if item.get("lbw") is not None:
            spec = _coerce_simple(str, item["lbw"], field + ".lbw", where).strip()
    else:
        raise InvalidInputError(f'{where}: {field} must be "NAME[:MULT]" or {{"lora": NAME, "multiplier": M}}, '
                                f"got {type(item).__name__}")
    if not name.strip():
        raise InvalidInputError(f"{where}: {field} names no LoRA")
    out: Dict[str, Any] = {"lora": name, "multiplier": float(mult)}
    if spec is not None:
        if not lbw:
            raise InvalidInputError(f"{where}: {field}: lbw= (block weights) is taken by bake, not here")
        if not spec:
            raise InvalidInputError(f"{where}: {field}: lbw= names no preset or list")
        out["lbw"] = spec
    return out


@dataclass
class BakeRequest(Request):
    """Write a checkpoint with LoRAs merged in: W' = W + sum of multiplier * delta, per layer."""

    job = "lora-bake"

    checkpoint: str = param(help="the checkpoint to bake into", model="checkpoint", positional=True,
                            metavar="CHECKPOINT")
    loras: List[Any] = param(help='the LoRAs and their multipliers: "NAME[:MULT][:lbw=BLOCKS]" (CLI, tab) or '
                                  '{"lora": NAME, "multiplier": M, "lbw": BLOCKS} (API; multiplier 1 when left out); '
                                  "BLOCKS: a lora-block-weight preset or list, as in <lora:NAME:M:lbw=BLOCKS>",
                             model="lora", positional=True, metavar="LORA[:MULT][:lbw=BLOCKS]")
    output: str = param(help="the checkpoint to write (.safetensors); API/UI: a file name in the checkpoint folder",
                        short="-o")
    overwrite: bool = param(False, help="replace an existing output")

    def check(self) -> None:
        where = self.job
        if not isinstance(self.loras, list) or not self.loras:
            raise InvalidInputError(f"{where}: give at least one LoRA to bake")
        self.loras = [_bake_item(x, i, where) for i, x in enumerate(self.loras)]


@dataclass
class BakeReport(Report):
    """What ``bake`` answers, plus ``name`` (the new checkpoint's name in the host's list)."""

    output: str
    arch: str
    touched: int
    loras: List[Dict[str, Any]]
    name: str
    #: a Flux control LoRA widened these keys: {key: {"from": shape, "to": shape}}
    widened: Optional[Dict[str, Dict[str, List[int]]]] = None

    def summary(self) -> str:
        lines = [f"Wrote {self.name}: {self.arch}, {self.touched} tensors changed"]
        for k, v in (self.widened or {}).items():
            lines.append(f"  {k}: widened from {v['from']} to {v['to']} (a control LoRA: the checkpoint now takes "
                         f"the control image's latents beside the noise)")
        for x in self.loras:
            extra = f", {x['unmatched']} unmatched" if x.get("unmatched") else ""
            blocks = f" lbw={x['lbw']}" if x.get("lbw") else ""
            lines.append(f"  {x['path']} x{x['multiplier']:g}{blocks}: {x['layers']} layers{extra}")
        lines.append(f"Output: {self.output}")
        return "\n".join(lines)


def run_bake(host: Any, req: BakeRequest, progress: Progress) -> BakeReport:
    from ..lora.bake import bake

    ckpt = host.resolve_input(req.checkpoint, "checkpoint")
    loras = [(host.resolve_input(x["lora"], "lora"), x["multiplier"], x.get("lbw")) for x in req.loras]
    out = _output(host, req.output, "checkpoint")
    res = bake(ckpt, loras, out, overwrite=req.overwrite, progress=progress.phase("baking"))
    host.refresh("checkpoint")
    return BakeReport(name=host.display_name(out, "checkpoint"), **res)


# ------------------------------------------------------------------------------------------------- inspect
@dataclass
class InspectRequest(Request):
    """What a LoRA file is: types, ranks, alphas, targets, base model, metadata (the header and alphas only)."""

    job = "lora-inspect"

    lora: str = param(help="the LoRA file", model="lora", positional=True, metavar="FILE")
    model: Optional[str] = param(None, help="a checkpoint: also list the modules that would not apply to it "
                                            "(shape mismatch, wrong architecture)", model="checkpoint")


@dataclass
class InspectReport(Report):
    """What ``inspect_lora`` answers, plus ``name`` (the LoRA's name in the host's list)."""

    path: str
    format: str
    file_size: int
    tensors: int
    base_model: str
    types: Dict[str, int]
    ranks: Dict[str, int]
    alphas: Dict[str, int]
    dora_layers: int
    conv_kxk_layers: int
    targets: Dict[str, int]
    unmatched: int
    unmatched_examples: List[str]
    unknown_modules: List[str]
    bundled_embeddings: List[str]
    metadata: Dict[str, str]
    blocks: Dict[str, Dict[str, Any]]
    model: Optional[str]
    model_arch: Optional[str]
    not_applied: List[Dict[str, str]]
    not_applied_counts: Dict[str, int]
    name: str
    naming: str = "unknown"
    unmatched_modules: List[Dict[str, str]] = field(default_factory=list)
    #: Flux control LoRA (BFL Canny/Depth): {"img_in_channels", "set_layers", "note"}; None for any other
    control: Optional[Dict[str, Any]] = None

    def summary(self) -> str:
        def counts(d: Dict[str, int], sep: str = " x") -> str:
            return ", ".join(f"{k}{sep}{v}" for k, v in d.items()) or "-"

        lines = [f"{self.path}  ({self.format}, {self.tensors} tensors)",
                 f"  base model : {self.base_model}",
                 f"  naming     : {self.naming}",
                 f"  types      : {counts(self.types)}",
                 f"  ranks      : {counts(self.ranks)}",
                 f"  alphas     : {counts(self.alphas)}",
                 f"  targets    : {counts(self.targets, ' ')}"]
        if self.dora_layers:
            lines.append(f"  DoRA layers: {self.dora_layers}")
        if self.control:
            lines.append(f"  control    : {self.control['note']}")
        if self.blocks:
            top = max((b["norm"] for b in self.blocks.values()), default=0.0) or 1.0
            lines.append("  blocks     : layers  sum |dW|")
            for b, v in self.blocks.items():
                bar = "#" * int(round(20 * v["norm"] / top))
                lines.append(f"    {b:<6} {v['layers']:>4}  {v['norm']:>10.4g}  {bar}")
        if self.model:
            lines.append(f"  checkpoint : {self.model} ({self.model_arch})")
        if self.not_applied:
            lines.append(f"  NOT APPLIED: {len(self.not_applied)} modules "
                         f"({', '.join(f'{v} {k}' for k, v in self.not_applied_counts.items())})")
            for x in self.not_applied:
                lines.append(f"    {x['module']}: {x['reason']} ({x['detail']})")
        else:
            lines.append("  not applied: none" + (" (names and types checked; give --model CHECKPOINT to check "
                                                  "shapes)" if not self.model else ""))
        if self.unmatched:
            lines.append(f"  unmatched  : {self.unmatched} (e.g. {', '.join(self.unmatched_examples)})")
        for u in self.unmatched_modules[:20]:
            lines.append(f"    {u['module']}: {u['reason']}")
        for k in sorted(self.metadata):
            v = self.metadata[k]
            lines.append(f"  {k} = {v if len(v) < 120 else v[:117] + '...'}")
        return "\n".join(lines)


def run_inspect(host: Any, req: InspectRequest, progress: Progress) -> InspectReport:
    from ..lora.inspect_lora import inspect_lora

    path = host.resolve_input(req.lora, "lora")
    model = host.resolve_input(req.model, "checkpoint") if req.model else None
    res = inspect_lora(path, model)
    if model is not None:
        res["model"] = host.display_name(model, "checkpoint")
    return InspectReport(name=host.display_name(path, "lora"), **res)


# ------------------------------------------------------------------------------------------------- resize
DYNAMIC = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class ResizeRequest(Request):
    """Resize a LoRA/LoCon: every layer's ΔW replaced by its truncated SVD at --rank (or a dynamic rank)."""

    job = "lora-resize"

    lora: str = param(help="the LoRA to resize", model="lora", positional=True, metavar="IN")
    output: str = param(help="the LoRA to write (.safetensors); API/UI: a file name in the LoRA folder",
                        short="-o")
    rank: int = param(help="the new rank (with a dynamic method: the largest rank)", minimum=1)
    dynamic_method: str = param("fixed", help="fixed: every layer at --rank; sv_ratio: keep singular values above "
                                              "s_max/P; sv_fro: keep the fraction P of the Frobenius norm; "
                                              "sv_cumulative: keep the fraction P of the sum of singular values",
                                choices=DYNAMIC)
    dynamic_param: Optional[float] = param(None, help="P of the dynamic method", minimum=0.0)
    dtype: Optional[str] = param(None, help="dtype of the written factors (default: the file's)", choices=DTYPES)
    device: str = param("cpu", help="cpu or cuda")
    overwrite: bool = param(False, help="replace an existing output")

    def check(self) -> None:
        self.device = _check_device(self.device)
        if self.dynamic_method != "fixed" and self.dynamic_param is None:
            raise InvalidInputError(f"{self.job}: dynamic_method {self.dynamic_method} needs dynamic_param")


@dataclass
class ResizeReport(Report):
    """What ``resize_lora`` answers, plus ``name`` (the new LoRA's name in the host's list)."""

    output: str
    arch: str
    layers: int
    kept_as_is: int
    kept_examples: List[str]
    size_before: int
    size_after: int
    min_energy: float
    layer_report: List[Dict[str, Any]]
    name: str

    def summary(self) -> str:
        ranks = sorted({x["rank"] for x in self.layer_report})
        rk = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        text = (f"Wrote {self.name}: {self.layers} {self.arch} layers at rank {rk}; "
                f"{_mib(self.size_before)} -> {_mib(self.size_after)}")
        if self.kept_as_is:
            text += f"\n{self.kept_as_is} modules of other types written unchanged (e.g. {self.kept_examples[0]})"
        return text + f"\n{energy_lines(self.layer_report)}\nOutput: {self.output}"


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def run_resize(host: Any, req: ResizeRequest, progress: Progress) -> ResizeReport:
    from ..lora.resize import resize_lora

    src = host.resolve_input(req.lora, "lora")
    out = _output(host, req.output, "lora")
    res = resize_lora(src, out, req.rank, req.dynamic_method, req.dynamic_param, dtype=req.dtype,
                      device=req.device, overwrite=req.overwrite, progress=progress.phase("resizing"))
    host.refresh("lora")
    return ResizeReport(name=host.display_name(out, "lora"), **res)


# ------------------------------------------------------------------------------------------------- merge
def _merge_item(item: Any, i: int, where: str) -> Dict[str, Any]:
    """One ``loras`` entry of a merge: ``"NAME[:WEIGHT]"`` or ``{"lora": NAME, "weight": W}``."""
    if isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in ("lora", "weight"))
        if unknown:
            raise InvalidInputError(f"{where}: loras[{i}] has unknown field(s): {', '.join(unknown)} "
                                    f"(known: lora, weight)")
        got = _bake_item({"lora": item["lora"], "multiplier": item.get("weight", 1.0)} if "lora" in item
                         else {"multiplier": 1.0}, i, where, lbw=False)
    else:
        got = _bake_item(item, i, where, lbw=False)
    return {"lora": got["lora"], "weight": got["multiplier"]}


@dataclass
class MergeRequest(Request):
    """Merge LoRAs into one: ΔW = Σ weight · ΔW_i per layer; exact without --rank, the best rank-R approximation
    with it."""

    job = "lora-merge"

    loras: List[Any] = param(help='the LoRAs and their weights: "NAME[:WEIGHT]" (CLI, tab) or '
                                  '{"lora": NAME, "weight": W} (API; weight 1 when left out)',
                             model="lora", positional=True, metavar="LORA[:WEIGHT]")
    output: str = param(help="the LoRA to write (.safetensors); API/UI: a file name in the LoRA folder",
                        short="-o")
    rank: Optional[int] = param(None, help="re-factor every layer to this rank (best approximation); default: "
                                           "exact (concatenated factors)", minimum=1)
    model: Optional[str] = param(None, help="a checkpoint giving the conv kernel of LoHa/LoKr layers (default: "
                                            "the architecture's layout)", model="checkpoint")
    dtype: Optional[str] = param(None, help="dtype of the written factors (default: the inputs' when they agree, else "
                                           "fp32)",
                                 choices=DTYPES)
    device: str = param("cpu", help="cpu or cuda")
    svd: str = param("auto", help="for --rank with LyCORIS inputs: auto (randomised for large layers), full or "
                                  "randomized", choices=("auto", "full", "randomized"))
    overwrite: bool = param(False, help="replace an existing output")

    def check(self) -> None:
        where = self.job
        self.device = _check_device(self.device)
        if not isinstance(self.loras, list) or not self.loras:
            raise InvalidInputError(f"{where}: give at least one LoRA to merge")
        self.loras = [_merge_item(x, i, where) for i, x in enumerate(self.loras)]


@dataclass
class MergeReport(Report):
    """What ``merge_loras`` answers, plus ``name`` (the new LoRA's name in the host's list)."""

    output: str
    arch: str
    layers: int
    rank: Optional[int]
    inputs: List[Dict[str, Any]]
    size_after: int
    dropped_embeddings: List[str]
    min_energy: float
    layer_report: List[Dict[str, Any]]
    name: str

    def summary(self) -> str:
        how = f"rank {self.rank} (best approximation)" if self.rank else "exact (factors concatenated)"
        lines = [f"Wrote {self.name}: {len(self.inputs)} LoRAs merged into {self.layers} {self.arch} layers, "
                 f"{how}, {_mib(self.size_after)}"]
        lines += [f"  {x['path']} x{x['weight']:g}" for x in self.inputs]
        if self.dropped_embeddings:
            lines.append(f"Bundled embeddings not carried over: {', '.join(self.dropped_embeddings)}")
        if self.rank:
            lines.append(energy_lines(self.layer_report))
        lines.append(f"Output: {self.output}")
        return "\n".join(lines)


def run_merge(host: Any, req: MergeRequest, progress: Progress) -> MergeReport:
    from ..lora.merge_loras import merge_loras

    loras = [(host.resolve_input(x["lora"], "lora"), x["weight"]) for x in req.loras]
    model = host.resolve_input(req.model, "checkpoint") if req.model else None
    out = _output(host, req.output, "lora")
    res = merge_loras(loras, out, rank=req.rank, model=model, dtype=req.dtype, device=req.device, svd=req.svd,
                      overwrite=req.overwrite, progress=progress.phase("merging"))
    host.refresh("lora")
    return MergeReport(name=host.display_name(out, "lora"), **res)


# ------------------------------------------------------------------------------------------------- the table
#: action (the CLI's ``lora ACTION``, the route's last path part) -> its job; faces register every entry
ACTIONS: Dict[str, JobSpec] = {
    "extract": JobSpec("lora-extract", ExtractRequest, ExtractReport, run_extract,
                       help="extract a LoRA from TUNED - BASE by SVD",
                       description="Extract a LoRA from the difference TUNED - BASE by truncated SVD, one layer at "
                                   "a time (kohya key names, alpha = rank). Attention and text-encoder layers at "
                                   "--rank; with --conv-rank also the ResNet and sampler layers."),
    "bake": JobSpec("lora-bake", BakeRequest, BakeReport, run_bake,
                    help="write CHECKPOINT with LoRAs merged in",
                    description="Write CHECKPOINT with LoRAs merged in: W' = W + sum of MULT * delta per layer "
                                "(delta in fp32, cast once to the stored dtype)."),
    "inspect": JobSpec("lora-inspect", InspectRequest, InspectReport, run_inspect,
                       help="type, rank, alpha, targets, blocks, base model, metadata; what would not apply",
                       description="What a LoRA file is (types, ranks, alphas, targets, base model, metadata), "
                                   "its strength per block, and every module that would not be applied with the "
                                   "reason (unknown target name, unsupported type; with --model CHECKPOINT also "
                                   "shape mismatch and wrong architecture)."),
    "resize": JobSpec("lora-resize", ResizeRequest, ResizeReport, run_resize,
                      help="re-factor a LoRA/LoCon at a new rank (truncated SVD of each layer's delta)",
                      description="Write IN at a new rank: each LoRA/LoCon layer's delta replaced by its truncated "
                                  "SVD, alpha set so the scale is kept. --dynamic-method picks the rank per layer "
                                  "(kohya's sv_ratio / sv_fro / sv_cumulative; --rank is then the largest)."),
    "merge": JobSpec("lora-merge", MergeRequest, MergeReport, run_merge,
                     help="merge LoRAs into one (exact, or the best rank-R approximation)",
                     description="Merge LoRAs: delta = sum of WEIGHT * delta_i per layer. Without --rank the "
                                 "factors are concatenated (exact); with --rank each layer is the best rank-R "
                                 "approximation. LoHa/LoKr/full inputs are merged through their full deltas. The "
                                 "inputs' metadata are kept under sdtoolkit_merged_from (JSON)."),
}

SPECS: Dict[str, JobSpec] = {spec.name: spec for spec in ACTIONS.values()}

__all__ = ["ACTIONS", "SPECS", "DTYPES", "ExtractRequest", "ExtractReport", "BakeRequest", "BakeReport",
           "InspectRequest", "InspectReport", "ResizeRequest", "ResizeReport", "MergeRequest", "MergeReport",
           "run_resize", "run_merge", "parse_lora_arg", "run_extract", "run_bake", "run_inspect"]
