"""Find network files by name, by alias (``ss_output_name``) or by hash (``sshs_model_hash``/``sshs_legacy_hash``
metadata, short prefixes accepted), like the WebUI's ``available_networks`` / ``available_network_aliases``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from ..files import open_model
from ..files.walk import walk_files
from ..files.hash_cache import HashCache, WebUIHashCache, cached_hash_file, webui_title
from ..errors import SdToolkitError

PathLike = Union[str, "os.PathLike[str]"]
SUFFIXES = (".safetensors", ".ckpt", ".pt")


@dataclass
class LoraEntry:
    name: str                       # file stem, as the WebUI names networks
    path: Path
    alias: Optional[str] = None     # ss_output_name
    hash: Optional[str] = None      # sshs_model_hash
    metadata: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "alias": self.alias or self.name, "path": str(self.path),
                "hash": self.hash, "metadata": {k: v for k, v in self.metadata.items() if k.startswith("ss_")}}


class LoraRegistry:
    """Scan ``dirs`` (recursively) and answer :meth:`find`. Call :meth:`refresh` after files change."""

    def __init__(self, dirs: Iterable[PathLike]):
        self.dirs = [Path(d) for d in dirs if d]
        self.entries: List[LoraEntry] = []
        self._mtimes: Dict[Path, float] = {}
        self.refresh()

    def refresh(self) -> None:
        old = {e.path: e for e in self.entries}
        out: List[LoraEntry] = []
        for d in self.dirs:
            if not d.is_dir():
                continue
            for p in walk_files(d, SUFFIXES):  # one walker (files.walk): loops, FIFOs, hidden names skipped
                fn = p.name
                try:
                    mt = p.stat().st_mtime
                except OSError:
                    continue
                if p in old and self._mtimes.get(p) == mt:
                    out.append(old[p])
                    continue
                meta: Dict[str, str] = {}
                if fn.lower().endswith(".safetensors"):
                    try:
                        with open_model(p) as r:
                            meta = dict(r.metadata)
                    except SdToolkitError:
                        meta = {}
                self._mtimes[p] = mt
                out.append(LoraEntry(p.stem, p, meta.get("ss_output_name") or None,
                                     meta.get("sshs_model_hash") or None, meta))
        self.entries = out

    def find(self, name: str) -> Optional[LoraEntry]:
        """By relative path without suffix, file stem, alias, or hash prefix (>= 8 hex digits)."""
        n = name.strip()
        for e in self.entries:
            for d in self.dirs:
                try:
                    rel = e.path.relative_to(d).with_suffix("").as_posix()
                except ValueError:
                    continue
                if rel == n:
                    return e
        for e in self.entries:
            if e.name == n:
                return e
        for e in self.entries:
            if e.alias == n:
                return e
        low = n.lower()
        if len(low) >= 8 and all(c in "0123456789abcdef" for c in low):
            for e in self.entries:
                if e.hash and e.hash.lower().startswith(low):
                    return e
        return None


#: hex digits of a network's short hash (the WebUI's ``NetworkOnDisk.shorthash``)
SHORTHASH_LEN = 12


def network_hash(entry: LoraEntry, cache: Optional[HashCache] = None, webui: Optional[WebUIHashCache] = None,
                 compute: bool = True) -> Optional[str]:
    """The hash the WebUI's Lora extension gives a network file (``NetworkOnDisk.hash``; the first
    :data:`SHORTHASH_LEN` hex digits are its ``shorthash``), looked up in the WebUI's order:

    1. ``sshs_model_hash`` metadata;
    2. the WebUI's own hash cache (title ``lora/<file stem>``; ``hashes-addnet`` for ``.safetensors``,
       ``hashes`` otherwise), trusted while the file is not newer;
    3. computed (``compute=False``, as under the WebUI's ``--no-hashing``, stops before): AutoV3 (the addnet
       hash: sha256 after the safetensors header) for ``.safetensors``, the full-file sha256 otherwise, through
       our hash cache ``cache``, and mirrored into ``webui`` so the WebUI finds it without hashing again.

    Returns None where no value is available (e.g. not hashed, or a ``.safetensors`` whose header is not one).
    Raises ``SdToolkitError`` when the file cannot be read.
    """
    if entry.hash:
        return entry.hash
    addnet = entry.path.suffix.lower() == ".safetensors"
    if webui is not None:
        title = webui_title("lora", entry.path)
        try:
            v = webui.sha256(entry.path, title, addnet=addnet) if title is not None else None
        except SdToolkitError:
            v = None    # unreadable / no diskcache: hash it ourselves
        if v:
            return v
    if not compute:
        return None

    def mirror(res) -> None:
        if webui is not None:
            try:
                webui.record("lora", [res])
            except SdToolkitError:
                pass  # the WebUI's cache is a convenience; the value stands without it

    res = cached_hash_file(entry.path, ["autov3"] if addnet else ["sha256"], cache, on_computed=mirror)
    return res.autov3 if addnet else res.sha256


def network_shorthash(entry: LoraEntry, cache: Optional[HashCache] = None, webui: Optional[WebUIHashCache] = None,
                      compute: bool = True) -> Optional[str]:
    """First :data:`SHORTHASH_LEN` hex digits of :func:`network_hash` (what "Lora hashes" infotext shows)."""
    h = network_hash(entry, cache, webui, compute)
    return h[:SHORTHASH_LEN] if h else None
