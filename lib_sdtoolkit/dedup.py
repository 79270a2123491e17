"""Canonical content hashes of weights, and finding duplicate model files (VAEs first of all).

Two files are *byte duplicates* when their sha256 match, and *weight duplicates* when their canonical content
hashes match although the bytes differ (``.pt`` vs ``.safetensors``, fp32 vs its fp16 copy, bare vs
``first_stage_model.`` keys, extra metadata, EMA / ``loss.*`` / DDPM junk).

Content hash (``sdt-content-v3``), computed from the tensors, not the file:

1. ``arch.detect`` + ``arch.split_components`` classify the keys; ``ema`` and ``junk`` (``model_ema.*``,
   ``loss.*``, DDPM buffers, anything outside the architecture's components) are dropped. Files of an unknown
   architecture keep every key except ``loss.*`` / ``model_ema.*``.
2. Names are made canonical: each key is written ``<component>/<name without the component prefix>``, so
   ``first_stage_model.encoder.conv_in.weight`` and ``encoder.conv_in.weight`` both become
   ``vae/encoder.conv_in.weight``; the old NAI CLIP layout (``transformer.embeddings.*``) is moved under
   ``transformer.text_model.*`` as the WebUI and model-toolkit do.
3. Tensors are made canonical: every floating tensor is rounded to **fp16** and hashed as fp16 bytes; integer
   and bool tensors keep their dtype; CLIP ``position_ids`` are read as int64 (as the WebUI reads them).
   Why fp16: it is the dtype models are shared in, and rounding is idempotent, so an fp32 file and its plain fp16
   cast give bit-identical fp16 values and therefore the same hash. Hashing at fp32 could never match an fp16
   copy. A **bf16** copy does not match: bf16 keeps 8 mantissa bits, fp16 keeps 10, so fp16(bf16(x)) loses the
   two bits fp16(x) keeps; nor would bf16 as the canonical dtype make fp32 and fp16 copies agree (double
   rounding, and fp16 subnormals flush values bf16 keeps). fp64 files match their fp32/fp16 copies except for
   rare double-rounding ties.
4. Each tensor gives a line ``name<TAB>dtype<TAB>shape<TAB>sha256(bytes)``; the lines are sorted by name and
   the sha256 of their concatenation is the content hash. The same is done per component (``components``), so
   the VAE baked into a checkpoint has the same ``components["vae"]`` as the standalone VAE file.
   (v1 hashed each tensor with BLAKE3; v2 uses hashlib's sha256 so that dedup needs no optional package: the
   WebUI does not ship ``blake3``. v3 keeps the marker keys ``v_pred`` / ``ztsnr`` / ``edm_*`` as their own
   component: a v-prediction SDXL and its eps twin are not duplicates. Cached older entries are recomputed.)
5. ``exact``: the same formula over the *exact* values: each floating tensor is written in the narrowest of
   fp16, fp32, fp64 that holds every one of its values bit for bit (so an fp16 file and its fp32 upcast agree,
   an fp32 file and its fp16 rounding do not). Files with the same content hash but different ``exact`` hashes
   are *near duplicates* (equal only after fp16 rounding): reported, labelled, never acted on.

The scan uses ``files.hash_cache.HashCache``: a second scan of an unchanged folder reads no file data. The cache
only speeds up the report: actions never trust it. Actions never delete: ``hardlink`` replaces byte duplicates (on
one filesystem only) by hard links to the kept copy, after comparing both files byte for byte at that moment;
``move`` moves duplicates with bit-identical weights (compared tensor by tensor at that moment) into another
folder, never a symbolic link (moving it would free nothing) and never a file other links in the scanned folders
point to. Nothing runs unless asked for explicitly.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

from .arch import EMA_PREFIX, ArchInfo, detect, split_components
from .errors import InvalidInputError, SdToolkitError
from .files import MODEL_SUFFIXES, open_model, tensor_bytes_view
from .files.hash_cache import HashCache
from .files.hashes import hash_file
from .files.writer import temp_name
from .inspect import human_bytes

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int, str], None]

CONTENT_VERSION = "sdt-content-v3"
CANONICAL_DTYPE = torch.float16
KINDS = ("vae", "checkpoint", "lora", "controlnet", "any")
ACTIONS = ("report", "hardlink", "move")

_KIND_OF_ARCH = {"VAE": "vae", "SD1": "checkpoint", "SD2": "checkpoint", "SDXL": "checkpoint",
                 "SDXL-refiner": "checkpoint", "Flux.1": "checkpoint", "SD3": "checkpoint", "LoRA": "lora",
                 "ControlNet": "controlnet"}
_NAI_CLIP = ("transformer.embeddings.", "transformer.encoder.", "transformer.final_layer_norm.")


def kind_of_architecture(architecture: Optional[str]) -> str:
    return _KIND_OF_ARCH.get(architecture or "", "unknown")


# ------------------------------------------------------------------------------------------------ content hash

@dataclass
class ContentHash:
    """The canonical content hash of one file (see the module docstring)."""

    hash: Optional[str]
    architecture: str
    components: Dict[str, str] = field(default_factory=dict)
    kept_keys: int = 0
    dropped_keys: int = 0
    version: str = CONTENT_VERSION
    exact: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def canonical_names(keys: Iterable[str], info: ArchInfo) -> Dict[str, Tuple[str, str]]:
    """``{key: (component, canonical name)}`` for the keys a content hash keeps (EMA and junk left out)."""
    keys = list(keys)
    out: Dict[str, Tuple[str, str]] = {}
    if info.architecture == "unknown":
        for k in keys:
            if not k.startswith(("loss.", EMA_PREFIX)):
                out[k] = ("unknown", k)
        return out
    groups = split_components(keys, info)
    for comp, ks in groups.items():
        if comp in ("ema", "junk"):
            continue
        prefix = info.prefixes.get(comp, "") or ""
        for k in ks:
            if k.startswith("loss."):
                continue
            name = k[len(prefix):] if prefix and k.startswith(prefix) else k
            if comp == "vae" and name.startswith("first_stage_model."):
                name = name[len("first_stage_model."):]
            if comp == "text_encoder" and info.architecture == "SD1" and name.startswith(_NAI_CLIP):
                name = "transformer.text_model." + name[len("transformer."):]
            out[k] = (comp, name)
    return out


def canonical_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor as the content hash sees it: floats rounded to fp16, position_ids as int64, ints as they are."""
    if name.endswith("position_ids"):
        return t.to(torch.int64)
    if t.dtype.is_floating_point:
        return t.to(CANONICAL_DTYPE)
    return t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                              b.contiguous().reshape(-1).view(torch.uint8))


def exact_tensor(name: str, t: torch.Tensor, rounded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor's exact values in the narrowest of fp16 / fp32 / fp64 that holds all of them bit for bit
    (ints, bools and position_ids as :func:`canonical_tensor`)."""
    if name.endswith("position_ids") or not t.dtype.is_floating_point:
        return canonical_tensor(name, t)
    if t.numel() == 0:
        return t.to(torch.float16)
    for dt in (torch.float16, torch.float32):
        if t.dtype == dt:
            return t
        c = rounded if (dt == torch.float16 and rounded is not None) else t.to(dt)
        if _same_bits(c.to(t.dtype), t):
            return c
    return t.to(torch.float64)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values: same dtype -> same bytes; else both widened to a dtype that holds each exactly
    (fp32 for fp16/bf16/fp32, fp64 with an fp64 or an integer on one side, int64 for integers)."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        fa, fb = a.dtype.is_floating_point, b.dtype.is_floating_point
        if fa and fb:
            common = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        elif fa or fb:
            common = torch.float64
        else:
            common = torch.int64
        a, b = a.to(common), b.to(common)
    return _same_bits(a, b)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes_view(t)).hexdigest()


def _combine(lines: List[str]) -> str:
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def content_hash(path: PathLike, progress: Optional[Callable[[int, int], None]] = None) -> ContentHash:
    """The canonical content hash of a model file (reads every kept tensor once)."""
    with open_model(path) as r:
        infos = r.infos()
        info = detect(infos)
        names = canonical_names(infos, info)
        lines: Dict[str, List[str]] = {}
        exact_lines: List[str] = []
        total = len(names)
        for i, key in enumerate(r.keys()):
            if key not in names:
                continue
            comp, name = names[key]
            raw = r.get(key)
            t = canonical_tensor(name, raw)
            line = f"{comp}/{name}\t{str(t.dtype).replace('torch.', '')}\t{list(t.shape)}\t{_tensor_digest(t)}"
            lines.setdefault(comp, []).append(line)
            x = exact_tensor(name, raw, t)
            exact_lines.append(f"{comp}/{name}\t{str(x.dtype).replace('torch.', '')}\t{list(x.shape)}\t"
                               f"{_tensor_digest(x)}")
            del t, x, raw
            if progress is not None:
                progress(i + 1, total)
    all_lines = [ln for ls in lines.values() for ln in ls]
    return ContentHash(hash=_combine(all_lines) if all_lines else None, architecture=info.architecture,
                       components={c: _combine(ls) for c, ls in sorted(lines.items())},
                       kept_keys=len(all_lines), dropped_keys=len(infos) - len(all_lines),
                       exact=_combine(exact_lines) if exact_lines else None)


# ------------------------------------------------------------------------------------------------ scanning

@dataclass
class ScannedFile:
    path: str
    size: int
    mtime_ns: int
    ino: int
    dev: int
    nlink: int
    architecture: Optional[str] = None
    kind: str = "unknown"
    sha256: Optional[str] = None
    content: Optional[str] = None
    components: Dict[str, str] = field(default_factory=dict)
    cached: bool = False
    exact: Optional[str] = None
    ctime_ns: int = 0
    link: Optional[str] = None  # where the symbolic link at ``path`` points, when it is one

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        return d


@dataclass
class ScanProblem:
    path: str
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class ScanReport:
    files: List[ScannedFile]
    problems: List[ScanProblem]
    skipped_kind: int = 0
    read_files: int = 0  # files whose data had to be read (cache misses)

    def to_dict(self) -> Dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "problems": [p.to_dict() for p in self.problems],
                "skipped_kind": self.skipped_kind, "read_files": self.read_files}


def iter_model_files(paths: Sequence[PathLike], exclude: Sequence[PathLike] = ()) -> List[Path]:
    """Model files under the given folders (recursive) or given directly; hidden names and ``*.tmp`` skipped."""
    ex = [os.path.realpath(os.fspath(e)) for e in exclude]
    out: List[Path] = []
    seen = set()

    def add(p: Path) -> None:
        rp = os.path.realpath(p)
        if rp in seen or any(rp == e or rp.startswith(e.rstrip(os.sep) + os.sep) for e in ex):
            return
        seen.add(rp)
        out.append(p)

    for raw in paths:
        p = Path(os.fspath(raw))
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not any(os.path.realpath(os.path.join(root, d)) == e for e in ex))
                for fn in sorted(files):
                    if fn.startswith(".") or not fn.lower().endswith(MODEL_SUFFIXES):
                        continue
                    add(Path(root) / fn)
        elif p.exists():
            add(p)
        else:
            raise InvalidInputError("no such file or folder", p)
    return out


def scan(paths: Sequence[PathLike], kind: str = "any", cache: Optional[HashCache] = None,
         progress: Optional[ProgressFn] = None, exclude: Sequence[PathLike] = ()) -> ScanReport:
    """sha256 + content hash of every model file of ``kind`` under ``paths`` (cache first).

    Unreadable files and files that changed while read are listed in ``problems``; the scan goes on.
    """
    if kind not in KINDS:
        raise InvalidInputError(f"unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
    files = iter_model_files(paths, exclude)
    report = ScanReport([], [])
    for i, p in enumerate(files):
        if progress is not None:
            progress(i, len(files), str(p))
        try:
            st = os.stat(p)
        except OSError as e:
            report.problems.append(ScanProblem(str(p), f"cannot stat: {e.strerror or e}"))
            continue
        entry = (cache.lookup(p, st) if cache is not None else None) or {}
        content = entry.get("content") if isinstance(entry.get("content"), dict) else None
        if content is not None and (content.get("version") != CONTENT_VERSION or "exact" not in content):
            content = None
        sha = (entry.get("hashes") or {}).get("sha256")
        arch = content.get("architecture") if content else entry.get("architecture")
        f = ScannedFile(str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_nlink,
                        ctime_ns=st.st_ctime_ns, link=os.readlink(p) if os.path.islink(p) else None)
        read = False
        try:
            if arch is None:
                read = True
                with open_model(p) as r:
                    arch = detect(r.infos()).architecture
                if cache is not None:
                    cache.store(p, st, architecture=arch)
            f.architecture, f.kind = arch, kind_of_architecture(arch)
            if kind != "any" and f.kind != kind:
                report.skipped_kind += 1
                continue
            if content is not None and sha is not None:
                f.cached = True
            else:
                read = True
                parts: Dict[str, Any] = {}
                if sha is None:
                    hres = hash_file(p, ("sha256",))
                    if hres.changed:
                        raise _Changed()
                    sha = hres.sha256
                    parts["hashes"] = {"sha256": sha}
                if content is None:
                    ch = content_hash(p)
                    content = ch.to_dict()
                    parts["content"] = content
                st2 = os.stat(p)
                if _stat_key(st2) != _stat_key(st):
                    raise _Changed()
                if cache is not None:
                    cache.store(p, st, **parts)
        except _Changed:
            report.problems.append(ScanProblem(str(p), "the file changed while it was read; not cached, not "
                                                       "compared (scan again when it is finished)"))
            continue
        except SdToolkitError as e:
            report.problems.append(ScanProblem(str(p), e.message))
            continue
        except OSError as e:
            report.problems.append(ScanProblem(str(p), f"cannot read: {e.strerror or e}"))
            continue
        except Exception as e:  # noqa: BLE001 - one odd file must not abort the scan of the whole folder
            first = (str(e).splitlines() or [""])[0][:200]
            report.problems.append(ScanProblem(str(p), f"skipped, unexpected {type(e).__name__}: {first}"))
            continue
        finally:
            report.read_files += int(read)
        f.sha256 = sha
        f.content = content.get("hash")
        f.exact = content.get("exact")
        f.components = dict(content.get("components") or {})
        report.files.append(f)
    if progress is not None:
        progress(len(files), len(files), "")
    return report


class _Changed(Exception):
    pass


def _stat_key(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)


def symlinks_under(paths: Sequence[PathLike]) -> Dict[str, List[str]]:
    """``{real path: [symbolic links to it]}`` for the model-file links under ``paths`` (recursive)."""
    out: Dict[str, List[str]] = {}
    for raw in paths:
        p = Path(os.fspath(raw))
        if not p.is_dir():
            continue
        for root, dirs, files in os.walk(p, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for fn in files:
                fp = os.path.join(root, fn)
                if fn.lower().endswith(MODEL_SUFFIXES) and os.path.islink(fp):
                    out.setdefault(os.path.realpath(fp), []).append(fp)
    return out


# ------------------------------------------------------------------------------------------------ grouping

def keeper_sort_key(path: str) -> Tuple[int, int, str, str]:
    """Which copy to keep: ``.safetensors`` first, then the shortest file name, then alphabetical."""
    name = os.path.basename(path)
    return (0 if name.lower().endswith(".safetensors") else 1, len(name), name.lower(), path)


@dataclass
class DupGroup:
    """Files holding the same weights. ``match``: ``bytes`` (all byte-identical), ``content`` (bit-identical
    weights, different files) or ``near`` (some only equal after fp16 rounding: near duplicates, never moved)."""

    match: str
    key: str
    files: List[ScannedFile]  # keeper first
    byte_sets: List[List[str]]  # paths grouped by sha256 (keeper's set first)
    gain_bytes: int
    kind: str
    exact_sets: List[List[str]] = field(default_factory=list)  # paths grouped by exact weights (keeper's first)

    @property
    def keeper(self) -> ScannedFile:
        return self.files[0]

    @property
    def duplicates(self) -> List[ScannedFile]:
        return self.files[1:]

    def to_dict(self) -> Dict[str, Any]:
        return {"match": self.match, "key": self.key, "kind": self.kind, "keeper": self.keeper.path,
                "duplicates": [f.path for f in self.duplicates], "files": [f.to_dict() for f in self.files],
                "byte_sets": self.byte_sets, "exact_sets": self.exact_sets, "gain_bytes": self.gain_bytes,
                "size": self.keeper.size}


def _gain(files: List[ScannedFile]) -> int:
    """Bytes freed by keeping only the first file (each inode counted once; hard links to it free nothing)."""
    seen = {(files[0].dev, files[0].ino)}
    total = 0
    for f in files[1:]:
        k = (f.dev, f.ino)
        if k in seen:
            continue
        seen.add(k)
        total += f.size
    return total


def _keep_key(prefer: Sequence[str]) -> Callable[[str], Tuple[Any, ...]]:
    """The keeper order: a file the user chose to keep first (matched by absolute or real path), then
    :func:`keeper_sort_key`."""
    chosen = {os.path.abspath(p) for p in prefer} | {os.path.realpath(p) for p in prefer}

    def key(path: str) -> Tuple[Any, ...]:
        mine = os.path.abspath(path) in chosen or (os.path.realpath(path) in chosen and not os.path.islink(path))
        return (0 if mine else 1,) + keeper_sort_key(path)

    return key


def find_duplicates(files: Sequence[ScannedFile], keep: Sequence[str] = ()) -> List[DupGroup]:
    """Group files by content hash (or by sha256 when no content hash could be made), largest gain first. In each
    group the copy kept is one of ``keep`` when the group holds one (two in one group: an error), else the first by
    :func:`keeper_sort_key`."""
    order = _keep_key(keep)
    by_key: Dict[Tuple[str, str], List[ScannedFile]] = {}
    for f in files:
        if f.content:
            by_key.setdefault(("content", f.content), []).append(f)
        elif f.sha256:
            by_key.setdefault(("bytes", f.sha256), []).append(f)
    groups: List[DupGroup] = []
    for (what, key), members in by_key.items():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda f: order(f.path))
        if keep and len([f for f in members if order(f.path)[0] == 0]) > 1:
            both = [f.path for f in members if order(f.path)[0] == 0]
            raise InvalidInputError(f"keep names {len(both)} copies of the same weights ({', '.join(both)}); "
                                    f"choose one per group")
        shas: Dict[str, List[str]] = {}
        for f in members:
            shas.setdefault(f.sha256 or f.path, []).append(f.path)
        byte_sets = sorted(shas.values(), key=lambda ps: (members[0].path not in ps, order(ps[0])))
        exacts: Dict[str, List[str]] = {}
        for f in members:
            exacts.setdefault(f.exact or f.sha256 or f.path, []).append(f.path)
        exact_sets = sorted(exacts.values(), key=lambda ps: (members[0].path not in ps, order(ps[0])))
        match = "bytes" if len(shas) == 1 else ("content" if len(exacts) == 1 else "near")
        kinds = {f.kind for f in members}
        groups.append(DupGroup(match, key, members, byte_sets, _gain(members),
                               kinds.pop() if len(kinds) == 1 else "mixed", exact_sets))
    groups.sort(key=lambda g: (-g.gain_bytes, g.keeper.path))
    return groups


# ------------------------------------------------------------------------------------------------ actions

@dataclass
class ActionResult:
    path: str
    action: str  # "hardlinked", "moved", "skipped"
    target: Optional[str] = None
    reason: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _unchanged(f: ScannedFile) -> Optional[str]:
    try:
        st = os.stat(f.path)
    except OSError as e:
        return f"cannot stat: {e.strerror or e}"
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.ino):
        return "changed since the scan; scan again"
    return None


_CHUNK = 8 << 20


def verify_same_bytes(a: PathLike, b: PathLike) -> Optional[str]:
    """Compare two files byte for byte from open descriptors, now; None when identical, else why not.

    Each file is ``fstat``-ed before and after the compare (size, mtime, ctime, inode): a file that changes while
    it is compared is not called identical; the path must still name the descriptor's file afterwards.
    """
    try:
        with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
            sa0, sb0 = os.fstat(fa.fileno()), os.fstat(fb.fileno())
            if not (stat.S_ISREG(sa0.st_mode) and stat.S_ISREG(sb0.st_mode)):
                return "not a regular file"
            if sa0.st_size != sb0.st_size:
                return "the files differ (size)"
            left = sa0.st_size
            while left > 0:
                x, y = fa.read(min(_CHUNK, left)), fb.read(min(_CHUNK, left))
                if x != y:
                    return "the files' bytes differ"
                if not x:
                    return "a file got shorter while it was compared"
                left -= len(x)
            if fa.read(1) or fb.read(1):
                return "a file grew while it was compared"
            sa1, sb1 = os.fstat(fa.fileno()), os.fstat(fb.fileno())
            pa, pb = os.stat(a), os.stat(b)
    except OSError as e:
        return f"cannot compare: {e.strerror or e}"
    if _stat_key(sa0) != _stat_key(sa1) or _stat_key(sb0) != _stat_key(sb1):
        return "a file changed while it was compared"
    if (pa.st_ino, pa.st_dev) != (sa1.st_ino, sa1.st_dev) or (pb.st_ino, pb.st_dev) != (sb1.st_ino, sb1.st_dev):
        return "a file was replaced while it was compared"
    return None


def verify_same_weights(keeper: PathLike, dup: PathLike) -> Optional[str]:
    """Compare the kept tensors of two model files value by value (bit-identical, see :func:`same_values`), now;
    None when identical, else why not. Both files are ``stat``-ed before and after."""
    try:
        s0 = (_stat_key(os.stat(keeper)), _stat_key(os.stat(dup)))
        with open_model(keeper) as rk, open_model(dup) as rd:
            nk = {v: k for k, v in canonical_names(rk.infos(), detect(rk.infos())).items()}
            nd = {v: k for k, v in canonical_names(rd.infos(), detect(rd.infos())).items()}
            if set(nk) != set(nd):
                return "the files do not hold the same tensors"
            for cname in sorted(nk):
                ta, tb = rk.get(nk[cname]), rd.get(nd[cname])
                if cname[1].endswith("position_ids"):
                    ta, tb = canonical_tensor(cname[1], ta), canonical_tensor(cname[1], tb)
                if not same_values(ta, tb):
                    return (f"weights differ in {cname[0]}/{cname[1]} (equal at most after fp16 rounding): "
                            "not bit-identical")
                del ta, tb
        s1 = (_stat_key(os.stat(keeper)), _stat_key(os.stat(dup)))
    except SdToolkitError as e:
        return f"cannot compare: {e.message}"
    except OSError as e:
        return f"cannot compare: {e.strerror or e}"
    if s0 != s1:
        return "a file changed while it was compared"
    return None


def _hardlink(keeper: ScannedFile, dup: ScannedFile) -> ActionResult:
    if (keeper.dev, keeper.ino) == (dup.dev, dup.ino):
        return ActionResult(dup.path, "skipped", keeper.path, "already a hard link of the kept file")
    if keeper.dev != dup.dev:
        return ActionResult(dup.path, "skipped", keeper.path, "on another filesystem; a hard link is impossible")
    for f in (keeper, dup):
        if os.path.islink(f.path):
            return ActionResult(dup.path, "skipped", keeper.path, f"{f.path}: a symbolic link; not linked")
        why = _unchanged(f)
        if why:
            return ActionResult(dup.path, "skipped", keeper.path, f"{f.path}: {why}")
    d = Path(dup.path)
    tmp = temp_name(d)
    try:
        os.link(keeper.path, tmp)
        # the cache said "same bytes"; only the bytes themselves, compared now, may replace a file
        why = verify_same_bytes(keeper.path, dup.path)
        if why:
            os.unlink(tmp)
            return ActionResult(dup.path, "skipped", keeper.path, f"not linked: {why}")
        os.replace(tmp, d)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return ActionResult(dup.path, "skipped", keeper.path, f"cannot link: {e.strerror or e}")
    return ActionResult(dup.path, "hardlinked", keeper.path)


def _free_target(folder: Path, name: str) -> Path:
    t = folder / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while os.path.lexists(t):
        t = folder / f"{stem} ({n}){suffix}"
        n += 1
    return t


def _place(src: Path, folder: Path, name: str) -> Path:
    """Move ``src`` into ``folder`` as ``name`` (same filesystem) without ever replacing a file that is there or
    appears meanwhile: link then unlink (a taken name gets the next `` (n)``); rename where links are not
    supported."""
    for _ in range(1000):
        target = _free_target(folder, name)
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:
            if os.path.lexists(target):
                raise
            os.rename(src, target)
            return target
        os.unlink(src)
        return target
    raise OSError(f"no free name for {name} in {folder}")


def _move(keeper: ScannedFile, dup: ScannedFile, to: Path,
          links: Optional[Mapping[str, List[str]]] = None) -> ActionResult:
    if dup.link is not None or os.path.islink(dup.path):
        return ActionResult(dup.path, "skipped", None, f"a symbolic link (to {dup.link or os.readlink(dup.path)}): "
                                                       "moving it frees nothing and would copy its target; not moved")
    others = [p for p in (links or {}).get(os.path.realpath(dup.path), []) if p != dup.path]
    if others:
        return ActionResult(dup.path, "skipped", None, f"symbolic links point to it ({', '.join(others[:3])}): "
                                                       "moving it would leave them dangling; not moved")
    why = _unchanged(dup)
    if why:
        return ActionResult(dup.path, "skipped", None, why)
    why = verify_same_bytes(keeper.path, dup.path) and verify_same_weights(keeper.path, dup.path)
    if why:
        return ActionResult(dup.path, "skipped", keeper.path, f"not moved: {why}")
    target = _free_target(to, dup.name)
    try:
        if os.stat(to).st_dev == os.lstat(dup.path).st_dev:
            target = _place(Path(dup.path), to, dup.name)  # same filesystem: no copy
        else:
            st0 = os.stat(dup.path)
            tmp = temp_name(target)
            try:
                shutil.copyfile(dup.path, tmp, follow_symlinks=False)
                shutil.copystat(dup.path, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                if os.path.getsize(tmp) != dup.size or _stat_key(os.stat(dup.path)) != _stat_key(st0):
                    raise OSError("the file changed while it was copied")
                target = _place(tmp, to, dup.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.unlink(dup.path)  # the verified copy is in place: this is the move the user asked for
    except OSError as e:
        return ActionResult(dup.path, "skipped", str(target), f"cannot move: {e.strerror or e}")
    return ActionResult(dup.path, "moved", str(target))


def apply_action(groups: Sequence[DupGroup], action: str, to: Optional[PathLike] = None,
                 links: Optional[Mapping[str, List[str]]] = None,
                 allowed: Optional[Callable[[str], Optional[str]]] = None) -> List[ActionResult]:
    """Run ``hardlink`` or ``move`` on the duplicates of ``groups`` (``report`` does nothing).

    ``hardlink``: inside each set of byte-identical files, every copy but the preferred one becomes a hard link
    to it (same filesystem only), once the two files compared equal byte for byte right then; weight-only
    duplicates are listed as skipped (their bytes differ, a link would change the file). ``move``: every
    duplicate whose weights are bit-identical to the keeper's (checked from the tensors right then; near
    duplicates equal only after fp16 rounding are skipped) is moved into ``to``; names that exist there get
    `` (1)``, `` (2)``... Symbolic links, and files that ``links`` (``{real path: [links]}``) says are pointed to,
    are not moved. ``allowed(path)`` returns why a file may not be touched (None: it may). Never deletes anything.
    """
    if action not in ACTIONS:
        raise InvalidInputError(f"unknown action '{action}' (expected one of {', '.join(ACTIONS)})")
    results: List[ActionResult] = []
    if action == "report":
        return results
    if action == "move":
        if to is None:
            raise InvalidInputError("--action move needs --to DIR")
        dest = Path(to)
        if not dest.is_dir():
            raise InvalidInputError("the --to folder does not exist", dest)
        for g in groups:
            keeper_set = set(g.exact_sets[0]) if g.exact_sets else {g.keeper.path}
            for f in g.duplicates:
                why = allowed(f.path) if allowed is not None else None
                if why:
                    results.append(ActionResult(f.path, "skipped", None, why))
                elif f.path not in keeper_set and f.sha256 != g.keeper.sha256:
                    results.append(ActionResult(f.path, "skipped", g.keeper.path,
                                                "near duplicate: the weights are equal only after fp16 rounding, "
                                                "not bit-identical; not moved"))
                else:
                    results.append(_move(g.keeper, f, dest, links))
        return results
    if to is not None:
        raise InvalidInputError("--to is only for --action move")
    for g in groups:
        by_path = {f.path: f for f in g.files}
        for bs in g.byte_sets:
            members = sorted((by_path[p] for p in bs), key=lambda f: keeper_sort_key(f.path))
            keeper = members[0]
            for dup in members[1:]:
                why = next((w for w in ((allowed(x.path) if allowed is not None else None)
                                        for x in (keeper, dup)) if w), None)
                results.append(ActionResult(dup.path, "skipped", keeper.path, why) if why
                               else _hardlink(keeper, dup))
        if g.match != "bytes":
            for bs in g.byte_sets[1:]:
                results.append(ActionResult(bs[0], "skipped", g.keeper.path,
                                            "same weights but different bytes: not linked (use --action move)"))
    return results


# ------------------------------------------------------------------------------------------------ report

@dataclass
class DedupResult:
    scan: ScanReport
    groups: List[DupGroup]
    actions: List[ActionResult]
    action: str

    @property
    def gain_bytes(self) -> int:
        return sum(g.gain_bytes for g in self.groups)

    def to_dict(self) -> Dict[str, Any]:
        return {"action": self.action, "groups": [g.to_dict() for g in self.groups], "gain_bytes": self.gain_bytes,
                "files_scanned": len(self.scan.files), "files_read": self.scan.read_files,
                "skipped_kind": self.scan.skipped_kind, "problems": [p.to_dict() for p in self.scan.problems],
                "actions": [a.to_dict() for a in self.actions]}


def dedup(paths: Sequence[PathLike], kind: str = "any", action: str = "report", to: Optional[PathLike] = None,
          cache: Optional[HashCache] = None, progress: Optional[ProgressFn] = None,
          allowed: Optional[Callable[[str], Optional[str]]] = None, keep: Sequence[str] = ()) -> DedupResult:
    """Scan, group and (only when ``action`` says so) act. The ``to`` folder is never scanned. ``keep``: the copies
    to keep (one per group at most; other groups keep the first by :func:`keeper_sort_key`)."""
    if action not in ACTIONS:
        raise InvalidInputError(f"unknown action '{action}' (expected one of {', '.join(ACTIONS)})")
    if action == "move" and to is None:
        raise InvalidInputError("--action move needs --to DIR")
    if action != "move" and to is not None:
        raise InvalidInputError("--to is only for --action move")
    if to is not None and not Path(to).is_dir():
        raise InvalidInputError("the --to folder does not exist", to)
    rep = scan(paths, kind, cache, progress, exclude=[to] if to is not None else [])
    groups = find_duplicates(rep.files, keep)
    links = symlinks_under(paths) if action == "move" else None
    acts = apply_action(groups, action, to, links, allowed)
    return DedupResult(rep, groups, acts, action)




def table_rows(groups: Sequence[DupGroup]) -> List[List[Any]]:
    """One row per file: group, match, role, file, size, sha256[:10], content[:10] (for tables in UIs)."""
    rows: List[List[Any]] = []
    for i, g in enumerate(groups, 1):
        for j, f in enumerate(g.files):
            rows.append([i, g.match, "keep" if j == 0 else "duplicate", f.path, human_bytes(f.size),
                         (f.sha256 or "")[:10], (f.content or "")[:10],
                         human_bytes(g.gain_bytes) if j == 0 else ""])
    return rows


TABLE_HEADERS = ["group", "match", "role", "file", "size", "AutoV2", "content", "to gain"]


def format_report(res: DedupResult) -> str:
    lines: List[str] = []
    if not res.groups:
        lines.append(f"no duplicates among {len(res.scan.files)} files")
    for i, g in enumerate(res.groups, 1):
        what = {"bytes": "identical bytes", "content": "same weights, different files"}.get(
            g.match, "near duplicates: equal only after fp16 rounding (never moved)")
        lines.append(f"[{i}] {what} ({g.kind}), {human_bytes(g.gain_bytes)} to gain")
        for j, f in enumerate(g.files):
            role = "keep" if j == 0 else "dup "
            lines.append(f"    {role} {human_bytes(f.size):>10}  {(f.sha256 or '?')[:10]}  {f.path}")
    for p in res.scan.problems:
        lines.append(f"problem: {p.path}: {p.reason}")
    lines.append(f"{len(res.scan.files)} files scanned ({res.scan.read_files} read, the rest from the cache), "
                 f"{len(res.groups)} groups, {human_bytes(res.gain_bytes)} to gain")
    for a in res.actions:
        extra = f" -> {a.target}" if a.target and a.action != "skipped" else ""
        why = f" ({a.reason})" if a.reason else ""
        lines.append(f"{a.action}: {a.path}{extra}{why}")
    return "\n".join(lines)


__all__ = ["CONTENT_VERSION", "CANONICAL_DTYPE", "ContentHash", "content_hash", "canonical_names",
           "canonical_tensor", "ScannedFile", "ScanReport", "ScanProblem", "scan", "iter_model_files", "DupGroup",
           "find_duplicates", "keeper_sort_key", "ActionResult", "apply_action", "DedupResult", "dedup",
           "format_report", "table_rows", "TABLE_HEADERS", "human_bytes", "KINDS", "ACTIONS"]
