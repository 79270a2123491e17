"""The one gate every output written for a client (API, UI tab) goes through.

:func:`resolve_output` turns an output name from a client into a path, and :func:`check_inside` is the rule it
ends with: the **real** folder the file will land in (``os.path.realpath`` of its parent, every symlink followed)
must be one of the host's configured model / output folders (also taken real) or inside one. A model folder that is
itself a symlink (``models/Lora -> /mnt/big/Lora``) is fine; a symlinked directory *inside* a model folder that
points elsewhere (``models/Stable-diffusion/linkdir -> /tmp``) is not a place outputs may go. The path returned is
the normalised, unresolved one (so names shown to the client stay relative to the model folder).

Merge, prune, LoRA bake / extract, the dedup move target and anything else a client names go through here; the
CLI, where the user names paths on their own machine, writes where it is told.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Union

from .errors import AccessDeniedError, InvalidInputError
from .validate import check_path_text

PathLike = Union[str, "os.PathLike[str]"]

MODEL_OUTPUT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def _norm(p: PathLike) -> Path:
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(p)))))


def _under(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def output_roots(host: Any) -> List[Path]:
    """Every folder outputs may land in: the model folders of all kinds and the output folder of each kind."""
    out: List[Path] = []
    for d in host.all_model_dirs():
        d = _norm(d)
        if d not in out:
            out.append(d)
    for k in host.kinds:
        try:
            d = _norm(host.output_dir(k))
        except Exception:  # noqa: BLE001 - a kind without a folder adds nothing
            continue
        if d not in out:
            out.append(d)
    return out


def check_inside(host: Any, path: PathLike, raw: Optional[str] = None, what: str = "output") -> Path:
    """Refuse (403) ``path`` unless its real parent folder is inside a configured model / output folder."""
    p = _norm(path)
    real_parent = os.path.realpath(p.parent)
    roots = output_roots(host)
    if not any(_under(real_parent, os.path.realpath(r)) for r in roots):
        lexical = any(_under(str(p.parent), str(r)) for r in roots)
        why = ("a symlinked folder inside the model folders leads outside them" if lexical
               else "the configured model folders")
        msg = (f"the {what} would be written to {real_parent}, outside the configured model folders ({why})"
               if lexical else f"the {what} is outside {why}")
        raise AccessDeniedError(msg, path=raw if raw is not None else os.fspath(path))
    return p


def suffixed(name: str, suffixes: Sequence[str], add_suffix: Optional[str]) -> str:
    """``name`` with ``add_suffix`` added when it ends in none of ``suffixes`` and has no other alphabetic extension
    (``merge_0.3`` -> ``merge_0.3.safetensors``; ``x.txt`` is refused: it names another kind of file)."""
    if not add_suffix or not suffixes or name.lower().endswith(tuple(s.lower() for s in suffixes)):
        return name
    ext = os.path.splitext(name)[1]
    if ext[1:].isalpha():
        raise InvalidInputError(f"the output must end in {' or '.join(suffixes)} (or have no suffix), got {ext!r}",
                                path=name)
    return name + add_suffix


def resolve_output(host: Any, raw: Optional[str], kind: str, *, plain: bool = False,
                   suffixes: Sequence[str] = MODEL_OUTPUT_SUFFIXES, add_suffix: Optional[str] = None,
                   default: Optional[str] = None, create_folder: bool = True) -> Path:
    """An output name from a client -> the path to write, inside the host's folders.

    ``raw``: a path relative to ``host.output_dir(kind)`` (no ``..``; with ``plain`` a bare file name only), or an
    absolute path inside a configured folder. ``default`` is used when ``raw`` is empty. A name not ending in one
    of ``suffixes`` gets ``add_suffix`` when given (unless it ends in another alphabetic extension: ``x.txt`` is
    refused, ``merge_0.3`` becomes ``merge_0.3.safetensors``), else is refused. The result always passes
    :func:`check_inside`.
    """
    name = str(raw if raw is not None else "").strip()
    if not name and default:
        name = default
    if not name:
        raise InvalidInputError("give an output file name")
    check_path_text(name, "output name")
    if plain and (len(re.split(r"[\\/]+", name)) != 1 or name.startswith(".") or name.startswith("~")):
        raise InvalidInputError(f"output {name!r} must be a plain file name (no folders, no '..', no leading '.')")
    parts = [x for x in re.split(r"[\\/]+", name) if x]
    if ".." in parts:
        raise AccessDeniedError("'..' is not allowed in an output path", path=name)
    name = suffixed(name, suffixes, add_suffix)
    if os.path.isabs(name) or name.startswith("~"):
        cand = _norm(name)
        if not any(_under(str(cand), str(r)) for r in output_roots(host)):
            raise AccessDeniedError("the output is outside the configured model folders", path=name)
    else:
        base = _norm(host.output_dir(kind))
        if create_folder:
            check_inside(host, base / "x", name)  # never create a folder through a link that leads outside
            base.mkdir(parents=True, exist_ok=True)
        cand = _norm(base / name)
        if not _under(str(cand), str(base)) or cand == base:
            raise AccessDeniedError("the output is outside the configured model folders", path=name)
    if not cand.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise InvalidInputError(f"the output must end in {', '.join(suffixes)}", cand)
    if cand.name.strip() != cand.name or not cand.name.strip("."):
        raise InvalidInputError("the output file name must not start or end with spaces", cand)
    return check_inside(host, cand, name)


def resolve_output_folder(host: Any, raw: Optional[str], kind: str, create: bool = True,
                          base: Optional[PathLike] = None) -> Path:
    """A folder a client names for files to be moved into (dedup ``to``): relative to ``base`` (default: the
    kind's output folder; one level may be created, its parent must exist) or absolute inside a configured
    folder."""
    name = str(raw if raw is not None else "").strip()
    if not name:
        raise InvalidInputError("give a folder name for 'to' (it must not be empty or blank)")
    check_path_text(name, "folder name")
    if ".." in re.split(r"[\\/]+", name):
        raise AccessDeniedError("'..' is not allowed in a folder path", path=name)
    if os.path.isabs(name) or name.startswith("~"):
        cand = _norm(name)
        if not any(_under(str(cand), str(r)) for r in output_roots(host)):
            raise AccessDeniedError("the folder is outside the configured model folders", path=name)
    else:
        base = _norm(base if base is not None else host.output_dir(kind))
        cand = _norm(base / name)
        if not _under(str(cand), str(base)) or cand == base:
            raise AccessDeniedError("the folder is outside the configured model folders", path=name)
    check_inside(host, cand / "x", name, what="folder")
    if cand.exists() and not cand.is_dir():
        raise InvalidInputError("'to' names a file, not a folder", cand)
    if not cand.exists():
        if not create:
            raise InvalidInputError("no such folder", cand)
        if not cand.parent.is_dir():
            raise InvalidInputError("the folder's parent does not exist (only the last folder is created)", cand)
        try:
            cand.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise InvalidInputError(f"cannot create the folder: {e.strerror or e}", cand) from None
        check_inside(host, cand / "x", name, what="folder")
    return cand


def resolve_input_folders(host: Any, folders: Optional[Sequence[str]], kind: str = "any") -> List[Path]:
    """Folders a client names to read (hash / dedup scans): relative to a model folder of ``kind`` (no ``..``) or
    absolute inside any model folder; none given -> the existing model folders of ``kind`` (all kinds for
    ``any``). Anything else is refused (403); a name that is not an existing folder is 422."""
    kinds = list(host.kinds) if kind in ("any", None) else [kind]
    roots: List[Path] = []
    for k in kinds:
        for d in host.model_dirs(k):
            d = _norm(d)
            if d not in roots:
                roots.append(d)
    all_roots = [_norm(d) for d in host.all_model_dirs()]
    if not folders:
        return [d for d in roots if d.is_dir()]
    out: List[Path] = []
    for raw in folders:
        raw = str(raw or "").strip()
        if not raw:
            continue
        check_path_text(raw, "folder")
        if ".." in re.split(r"[\\/]+", raw):
            raise AccessDeniedError("'..' is not allowed in a folder path", path=raw)
        if os.path.isabs(raw) or raw.startswith("~"):
            cand = _norm(raw)
            real = os.path.realpath(cand)
            if not any(_under(str(cand), str(d)) or _under(real, os.path.realpath(d)) for d in all_roots):
                raise AccessDeniedError("the folder is outside the configured model folders", path=raw)
            found: Optional[Path] = cand
        else:
            found = None
            for d in roots or all_roots:
                cand = _norm(d / raw)
                if _under(str(cand), str(d)) and cand.is_dir():
                    found = cand
                    break
            if found is None:
                raise InvalidInputError("no such folder under the model folders", raw)
        if not found.is_dir():
            raise InvalidInputError("not a folder", raw)
        out.append(found)
    return out


def sweep_host_temps(host: Any, folders: Optional[Iterable[PathLike]] = None, recursive: bool = True) -> List[Path]:
    """Remove stale temporary outputs (writer pid gone) in ``folders`` (default: all the host's folders, with
    their sub-folders; symlinked sub-folders are not followed)."""
    from .files.writer import sweep_stale_temps

    roots = list(folders) if folders is not None else output_roots(host)
    return sweep_stale_temps([r for r in roots if Path(r).is_dir()], recursive=recursive)


__all__ = ["resolve_output", "resolve_output_folder", "resolve_input_folders", "check_inside", "output_roots", "sweep_host_temps",
           "MODEL_OUTPUT_SUFFIXES"]
