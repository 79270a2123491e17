"""Maintenance jobs: prune (or extract one component), hash, dedup.

Each request is declared here once; ``python -m lib_sdtoolkit prune|hash|dedup``, ``POST /sdtoolkit/v1/prune``,
``/hash``, ``/dedup`` and the Prune / Hashes & dedup tabs are derived from it (:mod:`lib_sdtoolkit.jobs.faces`).
Every name a client sends goes through the host's gate (``resolve_input``, ``resolve_output``,
``resolve_folder(s)``, ``check_inside``); the features below (``prune.prune_file``, ``files.hash_cache``,
``dedup.dedup``) see paths, a cache object and a progress callable only.

On the command line (``host.trusted``) a path is the user's own: ``hash`` also takes folders (searched
recursively) and lists a missing file as a problem instead of stopping, ``dedup`` needs no ``confirm`` (the
``--action`` flag is the request), and the hash cache may be chosen (``--cache``/``--no-cache``) and mirrored into
a WebUI's own cache (``--webui-dir``). Elsewhere the host's settings say where the caches are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import Cancelled, InvalidInputError, SdToolkitError
from ..host import MODEL_KINDS
from ..progress import Progress
from .base import JobSpec, Report, Request, param

PRUNE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PRUNE_DTYPES = ("fp16", "bf16", "fp32", "keep")
#: the same tuples as ``dedup.KINDS`` / ``dedup.ACTIONS`` (that module imports torch; a test keeps them equal)
DEDUP_KINDS = ("vae", "checkpoint", "lora", "controlnet", "any")
DEDUP_ACTIONS = ("report", "hardlink", "move")


# ------------------------------------------------------------------------------------------------ shared
def kind_of(host: Any, path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """The model kind whose folder holds ``path`` (first match), or None."""
    p = os.path.normpath(os.path.abspath(os.fspath(path)))
    for k in MODEL_KINDS:
        for d in host.model_dirs(k):
            d = os.path.normpath(os.path.abspath(os.fspath(d)))
            if p.startswith(d.rstrip(os.sep) + os.sep):
                return k
    return None


def _shown(host: Any, path: Union[str, "os.PathLike[str]"]) -> str:
    """A path as a client may see it: the user's own path on the CLI, the name under the model folders elsewhere."""
    return str(path) if host.trusted else host.display_name(path)


def _reason(e: SdToolkitError) -> str:
    text = str(e)
    return text[len(e.path) + 2:] if e.path and text.startswith(e.path + ": ") else text


def _open_cache(host: Any, req: Any):
    """The hash cache to use: none (``--no-cache``), the file named (``--cache``, CLI), else the host's setting
    ``sdtoolkit_hash_cache`` or the default place."""
    if req.no_cache:
        return None
    from ..files.hash_cache import HashCache

    if req.cache:
        return HashCache(req.cache)
    settings = getattr(host, "settings", None) or {}
    return HashCache(settings.get("sdtoolkit_hash_cache") or None)


def _check_cache_flags(req: Any) -> None:
    if req.cache and req.no_cache:
        raise InvalidInputError(f"{req.job}: --cache and --no-cache contradict each other")


# ------------------------------------------------------------------------------------------------ prune
@dataclass
class PruneRequest(Request):
    """Prune a checkpoint or VAE, or extract one component (``only``)."""

    job = "prune"

    path: str = param(help="the model to prune (CLI: a file; API/UI: a name or path under the model folders)",
                      positional=True, metavar="FILE", model="checkpoint")  # or a VAE: ``kind`` says which
    kind: Optional[str] = param(None, help="look the name up among models of this kind only", choices=MODEL_KINDS)
    output: Optional[str] = param(None, help="output file (.safetensors streamed, or .ckpt/.pt); API/UI: a name "
                                             "written beside the models of the output's kind. Default: "
                                             "<name>-pruned-<dtype>.safetensors, <name>.vae.safetensors for --only "
                                             "vae (the CLI writes it beside the input)",
                                  short="-o", metavar="OUT")
    dtype: str = param("fp16", help="floating tensors become this (keep = as they are)", choices=PRUNE_DTYPES)
    keep_ema: bool = param(False, help="keep model_ema.* weights")
    keep_junk: bool = param(False, help="keep keys outside the known components")
    fix_position_ids: bool = param(False, help="reset CLIP position_ids to 0..76 (int64)")
    only: Optional[Union[str, List[str]]] = param(None, help="components to keep: unet, vae, text_encoder, "
                                                             "text_encoder_2 (text_encoders = both); comma list",
                                                  metavar="LIST")
    bare: Optional[bool] = param(None, help="strip the component prefix (one component only; the default for "
                                            "--only vae)")
    keep_prefix: bool = param(False, help="keep first_stage_model. on --only vae", api=False)
    overwrite: bool = param(False, help="replace the output if it exists (never an input)")

    def check(self) -> None:
        if self.keep_prefix:
            if self.bare:
                raise InvalidInputError("prune: --bare and --keep-prefix contradict each other")
            self.bare = False
        if isinstance(self.only, list) and not self.only:
            self.only = None

    def options(self):
        from ..prune import PruneOptions

        return PruneOptions(dtype=self.dtype, keep_ema=self.keep_ema, keep_junk=self.keep_junk,
                            fix_position_ids=self.fix_position_ids, only=self.only, bare=self.bare)


@dataclass
class PruneJobReport(Report):
    """The prune result (the API's answer: the feature's fields plus ``name`` and ``kind`` of the output)."""

    name: Optional[str]
    kind: str
    _result: Any = None

    def to_dict(self) -> Dict[str, Any]:
        d = self._result.to_dict()
        d["name"] = self.name
        d["kind"] = self.kind
        return d

    @property
    def written(self) -> bool:
        return bool(self._result.written)

    def summary(self) -> str:
        from ..inspect import human_bytes

        res = self._result
        lines = [f"{res.input}: {res.architecture}, {human_bytes(res.in_file_size)}"]
        lines.append("  kept: " + ", ".join(f"{c} {n}" for c, n in res.kept.items()))
        if res.dropped:
            lines.append("  dropped: " + ", ".join(f"{c} {n} keys" for c, n in res.dropped.items()))
        if res.converted:
            lines.append(f"  converted {res.converted} floating tensors to {res.dtype}")
        pid = res.position_ids or {}
        if pid.get("fixed"):
            lines.append(f"  CLIP position_ids reset to 0..N-1 (int64); wrong before: {pid.get('wrong') or 'none'}")
        elif pid.get("state") == "broken":
            lines.append(f"  warning: CLIP position_ids are broken ({pid.get('dtype')}); add --fix-position-ids")
        if res.prefix_stripped:
            lines.append(f"  keys written without the '{res.prefix_stripped}' prefix")
        if not res.written:
            lines.append(res.note or "nothing would change; no file written")
            return "\n".join(lines)
        saved = res.in_file_size - res.out_file_size
        change = f"saved {human_bytes(saved)}" if saved >= 0 else f"{human_bytes(-saved)} larger"
        lines.append(f"{res.output}: {human_bytes(res.out_file_size)} (before {human_bytes(res.in_file_size)}, "
                     f"{change})")
        return "\n".join(lines)


def prune_output(host: Any, req: PruneRequest, src: Path, options: Any) -> "tuple[Path, str]":
    """Where the prune writes and the kind of folder it lands in: a standalone VAE goes to the VAE folder,
    anything else to the folder of the input's kind; a blank name is derived from the options of this run."""
    from ..prune import default_output_name

    out_kind = "vae" if options.only == ["vae"] else (kind_of(host, src) or "checkpoint")
    default = default_output_name(src, options)
    if host.trusted:
        default = str(src.parent / default)
    out = host.resolve_output(req.output, out_kind, suffixes=PRUNE_SUFFIXES, default=default,
                              add_suffix=".safetensors")  # a bare name, as merge and the LoRA tools take it
    return out, out_kind


def run_prune(host: Any, req: PruneRequest, progress: Progress) -> PruneJobReport:
    from ..prune import prune_file

    src = host.resolve_input(req.path, req.kind)
    options = req.options()
    out, out_kind = prune_output(host, req, src, options)
    res = prune_file(src, out, options, overwrite=req.overwrite, progress=progress.counter("pruning"))
    if not res.written:
        return PruneJobReport(name=None, kind=out_kind, _result=res)
    host.refresh(out_kind)
    return PruneJobReport(name=host.display_name(out, out_kind), kind=out_kind, _result=res)


# ------------------------------------------------------------------------------------------------ hash
@dataclass
class HashRequest(Request):
    """File hashes (sha256/AutoV2, AutoV1, AutoV3, BLAKE3, CRC32) in one read, answered from the cache when the
    file is unchanged."""

    job = "hash"

    paths: List[str] = param(help="model files (CLI: files or folders, searched recursively; API/UI: names or "
                                  "paths under the model folders)", positional=True, metavar="FILE",
                             model="checkpoint")  # any kind: ``kind`` narrows the look-up
    kind: Optional[str] = param(None, help="look names up among models of this kind only", choices=MODEL_KINDS)
    algos: Optional[List[str]] = param(None, help="sha256 (autov2), autov1, autov3, blake3, crc32 or all; "
                                                  "comma-separate (default all)", flag="--algo", metavar="ALGO")
    cache: Optional[str] = param(None, help="hash cache file (default: $SDTOOLKIT_CACHE_DIR/hashes-v2.sqlite or "
                                            "~/.cache/sd-toolkit/hashes-v2.sqlite)", metavar="PATH", api=False)
    no_cache: bool = param(False, help="neither read nor write the hash cache", api=False)
    webui_dir: Optional[str] = param(None, help="also write the hashes into this WebUI's own hash cache "
                                                "(checkpoints and LoRAs under DIR/models)", metavar="DIR", api=False)

    def check(self) -> None:
        _check_cache_flags(self)


@dataclass
class HashReport(Report):
    """``results`` (one dict per file: the hashes, ``name``, ``kind``, ``civitai``), ``problems`` (files that
    could not be read or changed while read: ``path``, ``reason``), ``webui_cache_entries`` and, when the cache
    could not be used, ``cache_warning``."""

    results: List[Dict[str, Any]]
    problems: List[Dict[str, str]]
    webui_cache_entries: int
    cache_warning: Optional[str] = None
    _webui_backend: Optional[str] = None
    _single: bool = False

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        if d.get("cache_warning") is None:
            d.pop("cache_warning", None)
        return d

    def summary(self) -> str:
        labels = {"sha256": "SHA256", "autov1": "AutoV1", "autov3": "AutoV3", "blake3": "BLAKE3", "crc32": "CRC32"}
        lines: List[str] = []
        for r in self.results:
            lines.append(r["path"] + (" (cached)" if r.get("source") == "cache" else ""))
            for a in r.get("algos", []):
                v = r.get(a)
                lines.append(f"  {labels[a]:<7} {v if v is not None else '(not a safetensors file)'}")
                if a == "sha256":
                    lines.append(f"  {'AutoV2':<7} {r.get('autov2')}")
        if self._webui_backend is not None:
            lines.append(f"{self.webui_cache_entries} entries written to the WebUI's hash cache "
                         f"({self._webui_backend})")
        return "\n".join(lines)


def _hash_targets(host: Any, req: HashRequest, problems: List[Dict[str, str]]) -> List[Path]:
    if not req.paths:
        raise InvalidInputError("hash: name at least one model file")
    if not host.trusted:  # every name through the gate: 403 / 404 before any work
        return [host.resolve_input(str(p), req.kind) for p in req.paths]
    out: List[Path] = []
    for raw in req.paths:
        p = Path(os.path.expanduser(str(raw)))
        if p.is_dir():
            from ..dedup import iter_model_files  # dedup imports torch: only for folders

            out.extend(iter_model_files([p]))
            continue
        try:
            out.append(host.resolve_input(str(raw), req.kind))
        except SdToolkitError as e:
            problems.append({"path": str(raw), "reason": _reason(e)})
    return out


def run_hash(host: Any, req: HashRequest, progress: Progress) -> HashReport:
    """Hash the files; mirror sha256 / addnet hashes into the WebUI's cache where there is one (the WebUI then
    shows and keeps the same hashes). Unreadable files are listed in ``problems``, the rest still hashed."""
    from ..files.hash_cache import WebUIHashCache, cached_hash_file
    from ..files.hashes import normalize_algos

    wanted = normalize_algos(req.algos) if req.algos else None
    where = host  # whose folders say which files are checkpoints / LoRAs for the WebUI cache
    if req.webui_dir:
        from ..host import StandaloneHost

        where = StandaloneHost(webui_dir=req.webui_dir)  # "not a WebUI folder" when it has no models/
        webui_data = where.webui_dir
    else:
        webui_data = getattr(host, "webui_data_dir", None) or getattr(host, "webui_dir", None)
    problems: List[Dict[str, str]] = []
    targets = _hash_targets(host, req, problems)
    webui = WebUIHashCache.from_webui_env(webui_data) if webui_data else None
    if webui is not None and wanted is not None:  # the WebUI needs sha256, and the addnet hash for LoRAs
        wanted = normalize_algos(list(wanted) + ["sha256", "autov3"])
    results: List[Dict[str, Any]] = []
    written = 0
    cache = _open_cache(host, req)
    try:
        for t in targets:
            progress.check()  # Stop between files
            try:
                res = cached_hash_file(t, wanted, cache, progress=progress.bytes(f"hashing {t.name}"))
            except Cancelled:
                raise  # Stop: not a problem of this file
            except SdToolkitError as e:
                problems.append({"path": _shown(host, t), "reason": _reason(e)})
                continue
            if res.changed:
                problems.append({"path": _shown(host, t), "reason": "the file changed while it was hashed; the "
                                                                    "values are not trustworthy and were not cached"})
                continue
            k = kind_of(where, t)
            d = res.to_dict()
            d.update(name=host.display_name(t, kind_of(host, t)), kind=k, civitai=res.civitai())
            results.append(d)
            if webui is not None and k in ("checkpoint", "lora"):
                try:
                    written += webui.record(k, [res], where.model_dirs("checkpoint"))
                except SdToolkitError as e:
                    problems.append({"path": _shown(host, t), "reason": f"WebUI cache not written: {e}"})
    finally:
        if cache is not None:
            cache.close()
        if webui is not None:
            webui.close()
    return HashReport(results=results, problems=problems, webui_cache_entries=written,
                      cache_warning=cache.warning if cache is not None else None,
                      _webui_backend=webui.backend if webui is not None else None,
                      _single=len(req.paths) == 1)


def hash_cli_json(report: HashReport) -> Any:
    """``hash --json``: the result object for one file, a list otherwise (as the CLI always printed)."""
    r = report.results
    return r[0] if len(r) == 1 and report._single and not report.problems else r


# ------------------------------------------------------------------------------------------------ dedup
@dataclass
class DedupRequest(Request):
    """Find duplicate model files (identical bytes or identical weights); report, hard-link or move them."""

    job = "dedup"

    folders: Optional[List[str]] = param(None, help="folders to scan (CLI: paths; API/UI: under the model "
                                                    "folders; default there: the kind's model folders)",
                                         positional=True, metavar="DIR")
    kind: str = param("any", help="which models to compare", choices=DEDUP_KINDS)
    action: str = param("report", help="report (default; changes nothing), hardlink (byte duplicates become "
                                       "hard links, same filesystem only) or move (duplicates go to 'to')",
                        choices=DEDUP_ACTIONS)
    to: Optional[str] = param(None, help="where action move puts duplicates (API/UI: a folder under the model "
                                         "folders, created if missing)", metavar="DIR")
    confirm: bool = param(False, help="must be true for hardlink and move (they change files)", cli=False)
    keep: Optional[List[str]] = param(None, help="the copies to keep, at most one per duplicate group (default: "
                                                 ".safetensors first, then the shortest name)", metavar="FILE")
    cache: Optional[str] = param(None, help="hash cache file (default: $SDTOOLKIT_CACHE_DIR/hashes-v2.sqlite or "
                                            "~/.cache/sd-toolkit/hashes-v2.sqlite)", metavar="PATH", api=False)
    no_cache: bool = param(False, help="neither read nor write the hash cache", api=False)

    def check(self) -> None:
        _check_cache_flags(self)
        if self.action != "move" and self.to:
            raise InvalidInputError("dedup: 'to' (--to) is only for action 'move'")
        if self.action == "move" and self.to is None:
            raise InvalidInputError("dedup: action 'move' needs a folder for the duplicates: 'to' (--to DIR)")


@dataclass
class DedupReport(Report):
    """The dedup result (groups, gain, problems, actions) plus ``folders`` scanned, a ready-made ``table`` and,
    when the cache could not be used, ``cache_warning`` (the API's answer)."""

    folders: List[str]
    _result: Any = None
    _cache_warning: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        from ..dedup import TABLE_HEADERS, table_rows

        out = self._result.to_dict()
        out["folders"] = list(self.folders)
        if self._cache_warning:
            out["cache_warning"] = self._cache_warning
        out["table"] = {"headers": TABLE_HEADERS, "rows": table_rows(self._result.groups)}
        return out

    def summary(self) -> str:
        from ..dedup import format_report

        return format_report(self._result)

    @property
    def problems(self) -> List[Any]:
        return list(self._result.scan.problems)


def run_dedup(host: Any, req: DedupRequest, progress: Progress) -> DedupReport:
    from ..errors import AccessDeniedError

    if req.action != "report" and not (req.confirm or host.trusted):
        raise InvalidInputError(f"action '{req.action}' changes files: send confirm: true to run it")
    folders = host.resolve_folders(req.folders, req.kind)
    to = None
    if req.action == "move":
        k = "checkpoint" if req.kind == "any" else req.kind
        dirs = [d for kk in ([k] + [x for x in MODEL_KINDS if x != k]) for d in host.model_dirs(kk)]
        if not dirs and not host.trusted:
            raise InvalidInputError(f"no folder is configured for {k} models")
        # relative: inside the kind's first model folder; its real place must be a configured folder
        to = host.resolve_folder(req.to, k, for_writing=True, base=dirs[0] if dirs else None)

    def allowed(path: str) -> Optional[str]:
        try:
            host.check_inside(path, what="file")
        except AccessDeniedError:
            return "its real folder is outside the configured model folders (reached through a symlink); not touched"
        return None

    def tick(i: int, n: int, name: str) -> None:
        progress("scanning", i, n, os.path.basename(name) if name else "")

    from ..dedup import dedup

    # the copies to keep go through the gate like every client path
    keep = [str(host.resolve_input(k, None)) for k in (req.keep or [])]
    cache = _open_cache(host, req)
    try:
        res = dedup(folders, req.kind, req.action, to, cache, tick,
                    allowed=allowed if req.action != "report" else None, keep=keep)
    finally:
        if cache is not None:
            cache.close()
    if req.action != "report":
        host.refresh(None)
    return DedupReport(folders=[str(f) for f in folders], _result=res,
                       _cache_warning=cache.warning if cache is not None else None)


def problem_lines(report: Any) -> List[str]:
    """The CLI's stderr: one ``error:`` line per file that could not be read."""
    if isinstance(report, HashReport):
        return [f"error: {p['path']}: {p['reason']}" for p in report.problems]
    return [f"error: {p.path}: {p.reason}" for p in report.problems]


def exit_code(report: Any) -> int:
    """2 when some files could not be read or changed while read (the others were still processed)."""
    return 2 if report.problems else 0


SPECS = {
    "prune": JobSpec("prune", PruneRequest, PruneJobReport, run_prune,
                     help="drop EMA and junk, convert dtypes, or extract one component (e.g. the VAE)",
                     description="Keep the known components of the detected architecture, drop model_ema.* and "
                                 "junk, convert floating tensors (integers keep their dtype) and write the result "
                                 "atomically. --only vae extracts a standalone VAE with bare keys (the WebUI's VAE "
                                 "format). When nothing would change, no file is written and the report says so."),
    "hash": JobSpec("hash", HashRequest, HashReport, run_hash,
                    help="sha256/AutoV2, AutoV1, AutoV3, BLAKE3, CRC32 in one read, cached",
                    description="Compute file hashes in one read (AutoV2 = first 10 hex of sha256; AutoV1 = the "
                                "WebUI's legacy 8-hex model hash; AutoV3 = sha256 after the safetensors header, the "
                                "addnet/kohya hash). Unchanged files are answered from the cache without reading "
                                "them."),
    "dedup": JobSpec("dedup", DedupRequest, DedupReport, run_dedup,
                     help="find duplicate model files (identical bytes or identical weights)",
                     description="Group files by identical bytes and by identical canonical weights (fp16-rounded, "
                                 "prefixes stripped, EMA/junk dropped). Reports by default; --action hardlink "
                                 "replaces byte duplicates with hard links (same filesystem only), --action move "
                                 "--to DIR moves duplicates away. Nothing is ever deleted. Keeps .safetensors "
                                 "first, then the shortest name."),
}

__all__ = ["PruneRequest", "PruneJobReport", "HashRequest", "HashReport", "DedupRequest", "DedupReport", "SPECS",
           "run_prune", "run_hash", "run_dedup", "kind_of", "prune_output", "hash_cli_json", "problem_lines",
           "exit_code", "DEDUP_KINDS", "DEDUP_ACTIONS", "PRUNE_DTYPES"]
