"""Find network files by name, by alias (``ss_output_name``) or by hash (``sshs_model_hash``/``sshs_legacy_hash``
metadata, short prefixes accepted), like the WebUI's ``available_networks`` / ``available_network_aliases``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from ..files import open_model
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
            for root, dirs, files in os.walk(d, followlinks=True):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                for fn in sorted(files):
                    if not fn.lower().endswith(SUFFIXES):
                        continue
                    p = Path(root) / fn
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
