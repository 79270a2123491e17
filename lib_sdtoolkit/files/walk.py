"""The one folder walker: model files under folders, the same rules for every listing.

Used by the host's model lists, the LoRA registry and the dedup / hash scans. Rules:

* recursive, symlinked folders followed (model folders are often links to other disks), but each real folder is
  entered once: a link back up the tree (``models/Lora/loop -> ..``) ends the descent instead of looping;
* names starting with ``.`` are skipped (folders and files), and so are folders whose real path is in ``exclude``;
* only regular files are yielded (a FIFO, socket or device named ``x.safetensors`` is not a model: reading it
  would block or never end), with one of ``suffixes``;
* deterministic order: folders and files sorted by name.

Torch-free (the host's lists and the CLI's ``--help`` do not import torch).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Set, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

#: what a model file's name ends with (the WebUI lists these)
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_regular(path: PathLike) -> bool:
    """A regular file (after following symlinks); False for FIFOs, sockets, devices, folders and dangling links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def walk_files(folder: PathLike, suffixes: Sequence[str] = MODEL_FILE_SUFFIXES,
               exclude: Iterable[str] = (), regular_only: bool = True) -> Iterator[Path]:
    """Files under ``folder`` ending in one of ``suffixes`` (case-insensitive), by the module's rules."""
    ends = tuple(s.lower() for s in suffixes)
    excluded = {os.path.realpath(e) for e in exclude}
    seen: Set[str] = set()
    top = os.fspath(folder)
    if not os.path.isdir(top):
        return
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or real in excluded:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) not in seen | excluded)
        for fn in sorted(files):
            if fn.startswith(".") or (ends and not fn.lower().endswith(ends)):
                continue
            p = os.path.join(root, fn)
            if regular_only and not is_regular(p):
                continue
            yield Path(p)


def walk_folders(folders: Iterable[PathLike], suffixes: Sequence[str] = MODEL_FILE_SUFFIXES,
                 exclude: Iterable[str] = ()) -> Iterator[Tuple[Path, Path]]:
    """``(folder, file)`` for every file under each of ``folders`` (a file reached twice is yielded twice: callers
    that need one entry per file keep the first)."""
    for folder in folders:
        for p in walk_files(folder, suffixes, exclude):
            yield Path(folder), p


__all__ = ["walk_files", "walk_folders", "is_regular", "MODEL_FILE_SUFFIXES"]
