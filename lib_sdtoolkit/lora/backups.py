"""Where :class:`~lib_sdtoolkit.lora.apply.LoraPatcher` keeps the original of each weight it patches in place.

Three kinds, chosen per parameter at its first touch:

* ``file``: nothing is kept. The original is read back from the checkpoint file the weights were loaded from
  (``source``; safetensors only). The file is opened once, when the store is made, and its identity (device, inode,
  size, mtime) recorded; the descriptor stays open, so a file replaced by rename (how every tool here writes) keeps
  its old bytes readable. At the first touch of a parameter the file's tensor is read (``preadv`` into a
  one-layer buffer, never mapped), converted to the parameter's dtype, and compared bit for bit with the parameter:
  only when they are equal is the file used, so a weight that was changed after loading (another patcher, an
  upcast that does not round-trip, a different file) is never "restored" from the file. Before every read the
  descriptor's identity is checked again; a file changed in place since then is refused (new parameters fall back
  to ``spill``; a parameter already relying on it raises :class:`LoraBackupError` on restore, naming the file and
  the key, and keeps its patched value);
* ``spill``: the original bytes go to an unlinked temporary file (``spill_dir``; default the system temp folder, or,
  where that is a tmpfs kept in memory, the source checkpoint's folder or the current one)
  with ``pwrite`` and come back with ``preadv``; extents are reused for parameters of the same size; the file is
  truncated to nothing when no backup is left. The process keeps no copy (the page cache may, and gives it back
  under pressure);
* ``ram``: the parameter's own storage is kept and the patched values go to a new tensor (zero-copy, the fastest
  switches, but two copies of every touched weight), or a copy on ``ram_device``. Used when asked for, and as the
  fallback where a spill write fails (disk full, no temp folder): :attr:`BackupStore.fallbacks` says which and why.

Memory overhead of ``file`` and ``spill``: one layer's temporaries (the read buffer and its dtype conversion).
"""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import SdToolkitError

KINDS = ("auto", "file", "spill", "ram")
_PREADV = getattr(os, "preadv", None)


class LoraBackupError(SdToolkitError):
    """An original weight cannot be brought back exactly."""


@dataclass
class Entry:
    kind: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    tensor: Optional[torch.Tensor] = None      # ram
    offset: int = 0                            # spill
    nbytes: int = 0                            # spill
    key: str = ""                              # file
    file_dtype: Optional[torch.dtype] = None   # file


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _identity(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class BackupStore:
    """Originals of patched weights, by parameter key. ``names`` maps a parameter key to its tensor name in
    ``source`` (checkpoint keys)."""

    kind: str = "auto"
    source: Optional[Union[str, os.PathLike]] = None
    names: Mapping[object, str] = field(default_factory=dict)
    spill_dir: Optional[Union[str, os.PathLike]] = None
    ram_device: Optional[torch.device] = None
    #: (parameter key or file, reason) for every parameter that did not get the kind asked for
    fallbacks: List[Tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SdToolkitError(f"unknown backup kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind == "auto":
            self.kind = "ram" if self.ram_device is not None else ("file" if self.source else "spill")
        self._entries: Dict[object, Entry] = {}
        self._reader = None
        self._src_id: Optional[Tuple[int, int, int, int]] = None
        self._src_problem = ""
        self._spill = None
        self._spill_end = 0
        self._n_spill = 0
        self.spill_path = ""
        self._free: Dict[int, List[int]] = {}
        self._lock = threading.Lock()
        if self.kind == "file":
            self._open_source()

    # -- the source file
    def _open_source(self) -> None:
        from ..files.reader import SafetensorsReader, open_model

        if not self.source:
            self._src_problem = "no source file given"
            return
        try:
            reader = open_model(self.source)
        except (SdToolkitError, OSError) as e:
            self._src_problem = f"cannot open {self.source}: {e}"
            return
        if not isinstance(reader, SafetensorsReader):
            reader.close()
            self._src_problem = f"{self.source} is not a safetensors file (only those are read back per tensor)"
            return
        self._reader = reader
        self._src_id = _identity(os.fstat(reader._fd()))

    def _source_ok(self) -> bool:
        if self._reader is None:
            return False
        if _identity(os.fstat(self._reader._fd())) != self._src_id:
            self._src_problem = f"{self.source} was changed in place after it was opened"
            return False
        return True

    # -- bookkeeping
    def __contains__(self, k: object) -> bool:
        return k in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries))

    def entry(self, k: object) -> Entry:
        return self._entries[k]

    @property
    def ram_bytes(self) -> int:
        return sum(e.tensor.numel() * e.tensor.element_size() for e in self._entries.values() if e.tensor is not None)

    @property
    def spill_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.kind == "spill")

    def counts(self) -> Dict[str, int]:
        out = {"file": 0, "spill": 0, "ram": 0}
        for e in self._entries.values():
            out[e.kind] += 1
        return out

    # -- saving
    def save(self, k: object, param: torch.Tensor) -> Tuple[Entry, torch.Tensor]:
        """Record the original of ``param`` (its current value) under ``k``. Returns the entry and a tensor holding
        the original value (the parameter's own data, or a one-layer temporary) for the caller's maths."""
        data = param.detach()
        if self.kind == "ram":
            return self._save_ram(k, data), self._entries[k].tensor
        if self.kind == "file":
            got = self._save_file(k, data)
            if got is not None:
                return got
        try:
            return self._save_spill(k, data), data
        except OSError as e:
            self.fallbacks.append((str(k), f"spill write failed ({e}); kept in RAM"))
            return self._save_ram(k, data), self._entries[k].tensor

    def _save_ram(self, k: object, data: torch.Tensor) -> Entry:
        t = data
        if self.ram_device is not None and self.ram_device != data.device:
            t = data.to(self.ram_device, copy=True)
        e = Entry("ram", tuple(data.shape), data.dtype, data.device, tensor=t)
        self._entries[k] = e
        return e

    def _save_file(self, k: object, data: torch.Tensor) -> Optional[Tuple[Entry, torch.Tensor]]:
        name = self.names.get(k)
        why = ""
        if not self._source_ok():
            why = self._src_problem
        elif name is None or name not in self._reader:
            why = f"no tensor for it in {self.source}"
        else:
            info = self._reader.info(name)
            if tuple(info.shape) != tuple(data.shape):
                why = f"{name} in {self.source} has shape {list(info.shape)}, the weight {list(data.shape)}"
            else:
                orig = self._read_file(name, info.dtype, data.dtype, data.device, tuple(data.shape))
                if _same_bits(orig, data):
                    e = Entry("file", tuple(data.shape), data.dtype, data.device, key=name, file_dtype=info.dtype)
                    self._entries[k] = e
                    return e, orig
                why = f"the weight differs from {name} in {self.source} (changed after loading)"
        self.fallbacks.append((str(name or k), why + "; spilled to a temporary file instead"))
        return None

    def _read_file(self, name: str, file_dtype: torch.dtype, dtype: torch.dtype, device: torch.device,
                   shape: Tuple[int, ...], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is not None and file_dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            self._reader.read_into(name, out.view(-1))
            return out
        raw = self._reader.read_into(name, torch.empty(int(torch.Size(shape).numel()), dtype=file_dtype))
        t = raw.view(shape).to(device=device, dtype=dtype)
        if out is not None:
            out.copy_(t)
            return out
        return t

    def _save_spill(self, k: object, data: torch.Tensor) -> Entry:
        src = data.contiguous().cpu() if data.device.type != "cpu" or not data.is_contiguous() else data
        nbytes = src.numel() * src.element_size()
        with self._lock:
            if self._spill is None:
                d = self.spill_dir or _disk_temp_dir(self.source)
                if d is not None:
                    Path(d).mkdir(parents=True, exist_ok=True)
                self._spill = tempfile.TemporaryFile(prefix="sdtoolkit-lora-backup-", dir=d)
                self.spill_path = str(d or tempfile.gettempdir())
            free = self._free.get(nbytes)
            if free:
                off = free.pop()
            else:
                off = self._spill_end
                self._spill_end += nbytes
        buf = _bytes_view(src) if nbytes else memoryview(b"")
        fd = self._spill.fileno()
        done = 0
        try:
            while done < nbytes:
                done += os.pwrite(fd, buf[done:], off + done)
        except OSError:
            self._free.setdefault(nbytes, []).append(off)
            raise
        e = Entry("spill", tuple(data.shape), data.dtype, data.device, offset=off, nbytes=nbytes)
        self._entries[k] = e
        self._n_spill += 1
        return e

    # -- reading back
    def load(self, k: object, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The original of ``k``: into ``out`` when given (same shape and dtype), else a new tensor on the
        parameter's device (for ``ram`` the kept tensor itself)."""
        e = self._entries[k]
        if e.kind == "ram":
            if out is not None:
                out.copy_(e.tensor)
                return out
            return e.tensor
        if e.kind == "file":
            if not self._source_ok():
                raise LoraBackupError(f"cannot restore {e.key} exactly: {self._src_problem}; the weight keeps its "
                                      "patched value (reload the checkpoint)")
            return self._read_file(e.key, e.file_dtype, e.dtype, e.device, e.shape, out)
        direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
        t = out if direct else torch.empty(e.shape, dtype=e.dtype)
        buf = _bytes_view(t) if e.nbytes else memoryview(b"")
        fd = self._spill.fileno()
        got = 0
        while got < e.nbytes:
            n = _PREADV(fd, [buf[got:]], e.offset + got) if _PREADV else os.pread(fd, e.nbytes - got, e.offset + got)
            if isinstance(n, bytes):
                buf[got:got + len(n)] = n
                n = len(n)
            if not n:
                raise LoraBackupError(f"the LoRA backup file {self._spill.name} is shorter than expected")
            got += n
        if direct:
            return out
        if out is not None:
            out.copy_(t)
            return out
        return t.to(e.device) if e.device.type != "cpu" else t

    def drop(self, k: object) -> None:
        e = self._entries.pop(k, None)
        if e is not None and e.kind == "spill":
            self._n_spill -= 1
            with self._lock:
                self._free.setdefault(e.nbytes, []).append(e.offset)
        if self._n_spill == 0 and self._spill is not None and self._spill_end:
            with self._lock:
                self._spill.truncate(0)
                self._spill_end = 0
                self._free.clear()

    def close(self) -> None:
        self._entries.clear()
        self._n_spill = 0
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _memory_fs(path: str) -> bool:
    """Whether ``path`` lives on a file system kept in memory (tmpfs, ramfs): spilling there saves nothing."""
    best, kind = "", ""
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return False
    return kind in ("tmpfs", "ramfs")


def _disk_temp_dir(source) -> Optional[str]:
    """The system temp folder unless it is in memory; then the source checkpoint's folder or the current one."""
    cands = [tempfile.gettempdir()] + ([os.path.dirname(os.path.abspath(source))] if source else []) + [os.getcwd()]
    for d in cands:
        if os.path.isdir(d) and os.access(d, os.W_OK) and not _memory_fs(d):
            return d
    return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
