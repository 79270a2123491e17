"""Atomic, streaming writers.

Every output goes to a temporary file beside the target (``NAME.<pid>.<8 hex>.tmp``, ``pid`` = the writing
process), is fsynced, and only then renamed into place; on any error the temporary file is removed, so no partial
output ever appears and an existing file is never touched unless ``overwrite`` was asked for. Inputs are never
overwritten. A writer killed outright (``kill -9``, power loss) cannot remove its temporary file: the next write
into that folder (and ``inspect``, ``serve`` start) removes the files of exactly that pattern whose writer pid is
no longer running (:func:`sweep_stale_temps`).

``StreamingSafetensorsWriter`` knows every tensor's name, dtype and shape up front (the callers do: a merge
or a prune knows its output layout from the inputs' headers), writes the header first and then each tensor
at its offset as it comes, so it holds no tensor beyond the one being written. Writes may come in any order
and from several threads (``os.pwrite`` at fixed offsets).

With ``digest=True`` the writer also hashes what it writes (sha256 of the whole file and the legacy AutoV1), so
that nobody has to read the output again to name it (the history record, a later merge that takes it as an
input): the header is hashed first, then each written part in file order, by a lane thread of its own
(:class:`_DigestLane`) that takes the parts as they are written, in whatever order, holds the ones that come
early until the bytes before them are hashed, and only then hands each part's buffer back (the ``release``
callback of :meth:`StreamingSafetensorsWriter.write_part`), so no byte is copied. The digests are the file's as it
is on disk (every byte of the file is written exactly once, at its planned offset); they are given
(:meth:`StreamingSafetensorsWriter.file_hashes`) only when the lane saw every byte of the file, contiguous.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import InvalidInputError, ModelFileError, OutputExistsError, SdToolkitError
from .reader import TORCH_TO_ST, TensorInfo, dtype_size

PathLike = Union[str, "os.PathLike[str]"]
SpecLike = Union[TensorInfo, Tuple[str, torch.dtype, Sequence[int]]]


#: ``<target name>.<pid>.<8 hex>.tmp``: the only names :func:`sweep_stale_temps` ever removes
TEMP_RE = re.compile(r"^(?P<target>.+)\.(?P<pid>[1-9][0-9]{0,9})\.(?P<tag>[0-9a-f]{8})\.tmp$")


def temp_name(target: PathLike) -> Path:
    """A fresh temporary path beside ``target``, carrying this process's pid."""
    t = Path(target)
    return t.with_name(f"{t.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_stale_temps(folders: Iterable[PathLike], recursive: bool = False) -> List[Path]:
    """Remove our temporary outputs whose writer is gone; returns the removed paths.

    Only regular files (not links) whose name is exactly ``<name>.<pid>.<8 hex>.tmp`` with ``pid`` not running
    (and not this process) are removed; anything else is left alone. Unreadable folders are skipped.
    """
    removed: List[Path] = []
    seen = set()
    me = os.getpid()
    for folder in folders:
        if folder is None:
            continue
        top = Path(folder)
        walker = os.walk(top) if recursive else [(str(top), [], None)]
        for root, dirs, files in walker:
            if recursive:
                dirs[:] = [d for d in dirs if not d.startswith(".")]
            key = os.path.realpath(root)
            if key in seen:
                continue
            seen.add(key)
            if files is None:
                try:
                    files = os.listdir(root)
                except OSError:
                    continue
            for fn in files:
                m = TEMP_RE.match(fn)
                if m is None:
                    continue
                pid = int(m.group("pid"))
                if pid == me or pid_alive(pid):
                    continue
                p = Path(root) / fn
                try:
                    if not stat.S_ISREG(os.lstat(p).st_mode):
                        continue
                    os.unlink(p)
                except OSError:
                    continue
                removed.append(p)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError for a symlink loop
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(out: PathLike, inputs: Iterable[Optional[PathLike]] = (), overwrite: bool = False) -> Path:
    """Refuse an output that is one of the inputs, or that exists when ``overwrite`` is False."""
    o = Path(out)
    for i in inputs:
        if i is not None and _same_file(o, Path(i)):
            raise OutputExistsError("the output is one of the inputs; inputs are never overwritten", o)
    if o.exists() and not overwrite:
        raise OutputExistsError("the output exists (pass overwrite to replace it)", o)
    if o.exists() and o.is_dir():
        raise OutputExistsError("the output is a directory", o)
    if not o.parent.exists():
        raise ModelFileError("the output's folder does not exist", o.parent)
    return o


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(d), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error(e: OSError, path: Path) -> SdToolkitError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModelFileError("disk full while writing; the partial output was removed", path)
    if e.errno == errno.EFBIG:
        return ModelFileError("the file grew past the largest size this filesystem (or a file size limit) allows; "
                              "the partial output was removed", path)
    return ModelFileError(f"cannot write: {e.strerror or e}", path)


@contextlib.contextmanager
def atomic_path(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place."""
    t = Path(target)
    if t.exists() and not overwrite:
        raise OutputExistsError("the output exists (pass overwrite to replace it)", t)
    sweep_stale_temps([t.parent])
    tmp = temp_name(t)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if t.exists() and not overwrite:
            raise OutputExistsError("the output appeared while writing; not replaced", t)
        os.replace(tmp, t)
        _fsync_dir(t.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(e, t) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _as_spec(s: SpecLike) -> Tuple[str, torch.dtype, Tuple[int, ...]]:
    if isinstance(s, TensorInfo):
        return s.name, s.dtype, tuple(s.shape)
    name, dtype, shape = s
    return str(name), dtype, tuple(int(x) for x in shape)


def tensor_bytes_view(t: torch.Tensor):
    """A buffer over the tensor's bytes (little-endian, C order) without a copy where possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def build_header(specs: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]]) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    header: Dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str) or not isinstance(k, str)]
        if bad:
            raise InvalidInputError(f"safetensors metadata must be strings; not: {', '.join(map(str, bad[:5]))}")
        header["__metadata__"] = dict(metadata)
    offsets: Dict[str, Tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in specs:
        if name in offsets:
            raise InvalidInputError("duplicate tensor name in output", key=name)
        if dtype not in TORCH_TO_ST:
            raise InvalidInputError(f"dtype {dtype} cannot be stored in safetensors", key=name)
        n = dtype_size(dtype)
        for s in shape:
            n *= s
        offsets[name] = (pos, pos + n)
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return raw, offsets


#: with ``early_writeback``, the disk write of the data written so far is started every this many bytes
WRITEBACK_BYTES = 64 << 20

_SYNC_FILE_RANGE: Any = None


def start_writeback(fd: int) -> bool:
    """Start writing the file's dirty pages to disk without waiting for them (Linux ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``), so that the final ``fsync`` finds most of the file already written and the disk
    writes overlap the work that produces the rest. False where the call is not available (then the kernel's own
    write-back, and the final fsync, do it all)."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        _SYNC_FILE_RANGE = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                import ctypes.util

                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _SYNC_FILE_RANGE = fn
            except (OSError, AttributeError):
                _SYNC_FILE_RANGE = False
    if not _SYNC_FILE_RANGE:
        return False
    return _SYNC_FILE_RANGE(fd, 0, 0, 2) == 0  # SYNC_FILE_RANGE_WRITE, offset 0, to the end of the file


class _DigestLane:
    """sha256 and AutoV1 of a file fed as (offset, bytes) parts in any order, hashed in file order on a thread of
    its own (hashlib releases the GIL on large buffers, so hashing overlaps the writes and the work that makes
    them). A part that comes before the bytes ahead of it is held (with its ``release`` callback) until they come."""

    def __init__(self, total: int) -> None:
        from .hashes import _AutoV1, _Sha256

        self.total = total
        self.sinks = [_Sha256(), _AutoV1()]
        self.pos = 0
        self.ok = True
        self._early: Dict[int, Tuple[Any, Any]] = {}
        self._q: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sdtoolkit-write-digest", daemon=True)
        self._thread.start()

    def feed(self, pos: int, buf: Any, release: Any = None) -> None:
        self._q.put((pos, buf, release))

    def _hash(self, buf: Any, release: Any) -> None:
        try:
            mv = memoryview(buf).cast("B")
            for s in self.sinks:
                s.update(mv, self.pos)
            self.pos += len(mv)
        finally:
            if release is not None:
                release()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                break
            pos, buf, release = job
            if not self.ok or pos < self.pos or pos in self._early:  # a byte written twice: no digest
                self.ok = False
                if release is not None:
                    release()
                self._drop_early()  # nothing waits for the bytes before them any more
                continue
            if pos > self.pos:
                self._early[pos] = (buf, release)
                continue
            try:
                self._hash(buf, release)
                while self.pos in self._early:
                    self._hash(*self._early.pop(self.pos))
            except BaseException:  # noqa: BLE001 - the write goes on; the digest is just not given
                self.ok = False
                self._drop_early()
        self._drop_early()

    def _drop_early(self) -> None:
        early, self._early = self._early, {}
        for _, release in early.values():
            if release is not None:
                release()

    def abort(self) -> None:
        """The write failed: release every part without hashing it, and end the thread."""
        self.ok = False
        self.finish()

    def finish(self) -> Optional[Dict[str, str]]:
        """Wait for every part fed so far to be hashed; the digests if the whole file was, else None."""
        self._q.put(None)
        self._thread.join()
        if not self.ok or self.pos != self.total or self._early:
            return None
        return {s.name: s.result() for s in self.sinks}


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor with a fixed, known-in-advance layout.

    >>> with StreamingSafetensorsWriter(out, [("a", torch.float16, (2, 2))], {"k": "v"}) as w:
    ...     w.write("a", torch.zeros(2, 2, dtype=torch.float16))
    """

    def __init__(self, path: PathLike, specs: Iterable[SpecLike], metadata: Optional[Mapping[str, str]] = None,
                 overwrite: bool = False, early_writeback: bool = False, digest: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._specs = [_as_spec(s) for s in specs]
        self._by_name = {n: (d, s) for n, d, s in self._specs}
        self._header, self._offsets = build_header(self._specs, metadata)
        self._data_start = 8 + len(self._header)
        self._written: set = set()
        #: elements written so far of the tensors written in parts (:meth:`write_part`)
        self._parts: Dict[str, int] = {}
        self._lock = threading.Lock()
        #: start the disk write of what was written every :data:`WRITEBACK_BYTES` (see :func:`start_writeback`)
        self._early_writeback = early_writeback
        self._unflushed = 0
        self._ctx = None
        self._fd: Optional[int] = None
        self.tmp_path: Optional[Path] = None
        #: hash what is written, in file order (``digest``; see the module docstring)
        self._digest = digest
        self._lane: Optional[_DigestLane] = None
        #: after a successful exit with ``digest``: ``{"sha256": hex, "autov1": 8 hex}`` of the file, else None
        self.digests: Optional[Dict[str, str]] = None

    @property
    def total_size(self) -> int:
        end = max((e for _, e in self._offsets.values()), default=0)
        return self._data_start + end

    def __enter__(self) -> "StreamingSafetensorsWriter":
        self._ctx = atomic_path(self.path, self.overwrite)
        self.tmp_path = self._ctx.__enter__()
        try:
            self._fd = os.open(str(self.tmp_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            head = len(self._header).to_bytes(8, "little") + self._header
            os.pwrite(self._fd, head, 0)
            if self._digest:
                self._lane = _DigestLane(self.total_size)
                self._lane.feed(0, head)
        except OSError as e:
            self._abort(e)
        return self

    def _abort(self, e: BaseException) -> None:
        self._close_fd()
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        if isinstance(e, OSError):
            raise _os_error(e, self.path) from None
        raise e

    def _close_fd(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.abort()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _planned(self, name: str) -> tuple:
        """The planned (dtype, shape) of ``name``; the writer must be open and the name in the plan."""
        if self._fd is None:
            raise RuntimeError("writer is not open (use it as a context manager)")
        spec = self._by_name.get(name)
        if spec is None:
            raise InvalidInputError("tensor is not in the planned output layout", self.path, name)
        return spec

    def write(self, name: str, tensor: torch.Tensor, release: Optional[Callable[[], None]] = None) -> None:
        """Write the whole tensor ``name``. ``release``: called once the writer is done with ``tensor``'s bytes
        (at once, or with ``digest`` once they are hashed, from the lane's thread)."""
        dtype, shape = self._planned(name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise InvalidInputError(
                f"tensor is {tensor.dtype} {tuple(tensor.shape)} but the plan says {dtype} {shape}", self.path, name)
        with self._lock:
            if name in self._written or name in self._parts:
                raise InvalidInputError("tensor written twice", self.path, name)
            self._written.add(name)
        start, end = self._offsets[name]
        self._pwrite(tensor_bytes_view(tensor), self._data_start + start, release)

    def write_part(self, name: str, start: int, data: torch.Tensor,
                   release: Optional[Callable[[], None]] = None) -> None:
        """Write elements ``[start, start + data.numel())`` of tensor ``name`` (flattened, C order) from ``data``,
        a CPU tensor of the planned dtype. The parts of one tensor may come in any order and from several threads;
        the tensor counts as written once as many elements as it has were written (more is an error).

        ``release``: called once the writer no longer needs ``data``'s bytes, so that the caller may reuse the
        buffer: right after the write, or with ``digest`` once the lane has hashed them (from its thread; a part
        written ahead of the bytes before it is held until they are written)."""
        dtype, shape = self._planned(name)
        numel = 1
        for s in shape:
            numel *= s
        n = data.numel()
        if data.dtype != dtype or start < 0 or start + n > numel:
            raise InvalidInputError(f"part [{start}, {start + n}) of {data.dtype} does not fit the planned {dtype} "
                                    f"{shape}", self.path, name)
        with self._lock:
            done = self._parts.get(name, 0) + n
            if name in self._written or done > numel:
                raise InvalidInputError("tensor written twice", self.path, name)
            self._parts[name] = done
            if done == numel:
                self._written.add(name)
        if n:
            self._pwrite(tensor_bytes_view(data), self._data_start + self._offsets[name][0] + start * data.element_size(),
                         release)
        elif release is not None:
            release()

    def write_span(self, names: Sequence[str], data: torch.Tensor,
                   release: Optional[Callable[[], None]] = None) -> None:
        """Write the whole tensors ``names``, which follow each other in the planned layout, from ``data``: their
        bytes one after the other, as in the file (a uint8 CPU tensor). One write for many small tensors;
        ``release`` as for :meth:`write_part`."""
        if not names:
            raise ValueError("write_span needs at least one tensor")
        for n in names:
            self._planned(n)
        first, last = self._offsets[names[0]][0], self._offsets[names[-1]][1]
        pos = first
        for n in names:
            start, end = self._offsets[n]
            if start != pos:
                raise InvalidInputError(f"{', '.join(names[:3])}...: not next to each other in the planned layout",
                                        self.path, n)
            pos = end
        if data.dtype != torch.uint8 or data.numel() != last - first:
            raise InvalidInputError(f"span of {len(names)} tensors is {last - first} bytes, got {data.numel()} "
                                    f"{data.dtype}", self.path, names[0])
        with self._lock:
            for n in names:
                if n in self._written or n in self._parts:
                    raise InvalidInputError("tensor written twice", self.path, n)
            self._written.update(names)
        if last > first:
            self._pwrite(tensor_bytes_view(data), self._data_start + first, release)
        elif release is not None:
            release()

    def _pwrite(self, buf, pos: int, release: Optional[Callable[[], None]] = None) -> None:
        mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
        size = len(mv)
        at = pos
        try:
            while len(mv):
                n = os.pwrite(self._fd, mv, pos)
                pos += n
                mv = mv[n:]
        except BaseException:
            if release is not None:
                release()
            raise
        lane = self._lane
        if lane is not None and size:
            lane.feed(at, buf, release)
        elif release is not None:
            release()
        if self._early_writeback:
            with self._lock:
                self._unflushed += size
                kick = self._unflushed >= WRITEBACK_BYTES
                if kick:
                    self._unflushed = 0
            if kick:
                start_writeback(self._fd)

    @property
    def missing(self) -> list:
        return [n for n, _, _ in self._specs if n not in self._written]

    def __exit__(self, exc_type, exc, tb) -> None:
        ctx, self._ctx = self._ctx, None
        try:
            if exc is None and self.missing:
                exc = InvalidInputError(
                    f"{len(self.missing)} planned tensors were never written (first: {self.missing[0]})", self.path)
                exc_type = type(exc)
            if exc is None and self._fd is not None:
                os.ftruncate(self._fd, self.total_size)
        except OSError as e:
            exc, exc_type = e, type(e)
        lane, self._lane = self._lane, None
        digests = None
        if lane is not None:
            if exc is None:
                digests = lane.finish()
            else:
                lane.abort()
        self._close_fd()
        if ctx is None:
            return
        if exc is None:
            ctx.__exit__(None, None, None)
            self.digests = digests
        else:
            try:
                ctx.__exit__(exc_type, exc, exc.__traceback__)
            finally:
                pass
            if isinstance(exc, OSError):
                raise _os_error(exc, self.path) from None
            if tb is None:  # our own error (missing tensors): raise it
                raise exc


def save_safetensors(path: PathLike, state_dict: Mapping[str, torch.Tensor],
                     metadata: Optional[Mapping[str, str]] = None, overwrite: bool = False) -> Path:
    """Write a whole state dict (streamed tensor by tensor through the atomic writer)."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in state_dict.items()]
    with StreamingSafetensorsWriter(path, specs, metadata, overwrite=overwrite) as w:
        for k, t in state_dict.items():
            w.write(k, t)
    return Path(path)


def save_ckpt(path: PathLike, state_dict: Mapping[str, torch.Tensor], extra: Optional[Mapping[str, Any]] = None,
              overwrite: bool = False) -> Path:
    """Write a ``.ckpt`` (``{"state_dict": ..., **extra}``, torch.save zip format) atomically. In memory."""
    obj: Dict[str, Any] = {"state_dict": {k: v.contiguous() for k, v in state_dict.items()}}
    if extra:
        obj.update(extra)
    with atomic_path(path, overwrite) as tmp:
        try:
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
        except RuntimeError as e:
            # torch's zip writer turns a failed write (disk full, file too large) into a RuntimeError
            raise _write_failed(e, tmp) from None
    return Path(path)


def _write_failed(e: RuntimeError, tmp: Path) -> OSError:
    """The OSError behind a failed ``torch.save`` (its message hides the errno)."""
    for cause in (e.__cause__, e.__context__):
        if isinstance(cause, OSError):
            return cause
    try:
        free = os.statvfs(tmp.parent).f_bavail
    except OSError:
        free = None
    code = errno.ENOSPC if free == 0 or "write" in str(e).lower() else errno.EIO
    return OSError(code, str(e))


def save_state_dict(path: PathLike, state_dict: Mapping[str, torch.Tensor],
                    metadata: Optional[Mapping[str, str]] = None, overwrite: bool = False) -> Path:
    """Pick the writer by suffix: ``.safetensors`` or a pickle (``.ckpt/.pt/.pth/.bin``)."""
    if Path(path).suffix.lower() == ".safetensors":
        return save_safetensors(path, state_dict, metadata, overwrite)
    return save_ckpt(path, state_dict, None, overwrite)
