"""File hashes in one read: sha256 (AutoV2), the legacy 8-hex model hash (AutoV1), AutoV3, BLAKE3, CRC32.

What each one is (the WebUI's and Civitai's definitions):

* ``sha256``: the whole file. ``autov2`` is its first 10 hex digits (what the WebUI shows as ``[xxxxxxxxxx]`` and
  writes to infotext as "Model hash").
* ``autov1``: the WebUI's legacy ``model_hash()``: sha256 of the 0x10000 bytes read at offset 0x100000, first 8 hex
  digits. Like the WebUI we hash whatever those bytes are, so a file shorter than 0x110000 bytes still gets a value
  (of the shorter or empty slice).
* ``autov3``: the addnet / kohya hash: sha256 of a safetensors file's bytes after the 8-byte length and the JSON
  header (the full 64 hex digits; the WebUI's Lora shorthash is its first 12). ``None`` for files that are not
  safetensors.
* ``blake3``: BLAKE3 of the whole file (PyPI ``blake3``), 64 hex digits. Optional: the WebUI does not pin the
  ``blake3`` package (our install.py installs it). Without it the default set and ``all`` leave BLAKE3 out
  (:func:`blake3_available`), and asking for it by name raises :class:`MissingDependencyError` (a 4xx on the API)
  with the pip command, so hashing and dedup keep working.
* ``crc32``: the standard CRC-32 (IEEE 802.3, the one ``zlib.crc32`` computes) of the whole file, 8 hex digits.

Speed: the file is read once with ``readinto`` into a few reused, page-aligned buffers shared by every algorithm
(no copies; a bytearray's misaligned data cost the kernel's copy 3x the CPU here); each whole-file algorithm hashes
them on its own thread (``hashlib``, ``blake3``, ``zlib.crc32`` and ISA-L's crc32 release the GIL on large
buffers), so reading overlaps hashing and the algorithms run side by side; a buffer is reused when every lane has
finished with it. Fewer algorithms = fewer lanes (``algos``; the hash job's ``--algo``). CRC32 comes from the
optional PyPI ``isal`` (ISA-L, 0.1 s of CPU per GiB here) where it imports, else from zlib (0.35 s/GiB); the values
are the same. BLAKE3 splits its buffers over threads only when no sha256 lane is slower anyway.

The cost of all five: sha256 (SHA-NI) takes 0.75 s of CPU per GiB here, and AutoV3 is a *second* sha256 over
almost the same bytes. It cannot be derived from the first: SHA-256 carries a chaining state from block to
block, and the two messages start differently (AutoV3 skips the 8-byte length and the JSON header), so no block
of the two is hashed from the same state; it costs its own pass over the buffers (without a copy). All five take
about 2.3 s of CPU per GiB (two sha256, BLAKE3 0.4, CRC32 0.1, the read 0.25) against sha256 alone's 1.0: on two
free cores that projects to about 1.15 s of wall per GiB against 0.75 (1.5x), and on a loaded machine whose
processes share the CPU by group the wall ratio is the CPU ratio (2.3x measured). Only a cache hit
(``hash_cache``) or fewer lanes avoid it: without AutoV3 the other four cost 1.6 s of CPU per GiB.

A file that changes while it is hashed (size, mtime or inode differ between the start and the end, or fewer bytes
could be read than the size said) gives a result with ``changed=True``; callers must not cache it.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import mmap
import os
import queue
import threading
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import InvalidInputError, MissingDependencyError, ModelFileError
from .regular import open_regular

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int], None]

#: every algorithm, in report order
ALGORITHMS: Tuple[str, ...] = ("sha256", "autov1", "autov3", "blake3", "crc32")
#: accepted spellings (``--algo``), mapped to the algorithm computing them
ALGO_ALIASES: Dict[str, str] = {
    "sha256": "sha256", "autov2": "sha256", "autov1": "autov1", "model_hash": "autov1", "legacy": "autov1",
    "autov3": "autov3", "addnet": "autov3", "blake3": "blake3", "crc32": "crc32",
}
DEFAULT_CHUNK = 8 << 20
AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
#: below this size everything runs in the calling thread (thread start-up would cost more than it saves)
_THREAD_MIN_BYTES = 32 << 20


BLAKE3_MISSING = ("the BLAKE3 hash needs the Python package 'blake3', which is not installed here "
                  "(pip install blake3; inside the WebUI, SD Toolkit's install.py installs it at the next start)")


def blake3_available() -> bool:
    """Whether the optional ``blake3`` package imports (looked up each call: an install takes effect at once)."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return False
    return True


def available_algorithms() -> Tuple[str, ...]:
    """:data:`ALGORITHMS` less those whose package is missing (only ``blake3`` is optional)."""
    return ALGORITHMS if blake3_available() else tuple(a for a in ALGORITHMS if a != "blake3")


def normalize_algos(algos: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """Validate ``--algo`` values (``all`` or names/aliases, comma lists allowed) into :data:`ALGORITHMS` order.

    ``None`` (the default) and ``all`` mean every *available* algorithm; naming ``blake3`` without the package
    raises :class:`MissingDependencyError`."""
    if algos is None:
        return available_algorithms()
    wanted = set()
    for a in algos:
        for part in str(a).split(","):
            p = part.strip().lower()
            if not p:
                continue
            if p == "all":
                wanted.update(available_algorithms())
                continue
            if p not in ALGO_ALIASES:
                raise InvalidInputError(
                    f"unknown hash algorithm '{part.strip()}' (known: all, {', '.join(sorted(ALGO_ALIASES))})")
            wanted.add(ALGO_ALIASES[p])
    if not wanted:
        raise InvalidInputError("no hash algorithm given")
    if "blake3" in wanted and not blake3_available():
        raise MissingDependencyError(BLAKE3_MISSING)
    return tuple(a for a in ALGORITHMS if a in wanted)


@dataclass
class FileHashes:
    """The hashes of one file (lower-case hex; ``None`` for an algorithm not computed or not applicable)."""

    path: str
    size: int
    mtime: float
    mtime_ns: int
    sha256: Optional[str] = None
    autov1: Optional[str] = None
    autov3: Optional[str] = None
    blake3: Optional[str] = None
    crc32: Optional[str] = None
    #: True when the file changed while it was read: the values are not trustworthy and are not cached
    changed: bool = False
    #: where the values came from: "computed" or "cache"
    source: str = "computed"
    algos: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def autov2(self) -> Optional[str]:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["algos"] = list(self.algos)
        d["autov2"] = self.autov2
        return d

    def values(self) -> Dict[str, Optional[str]]:
        """The hash values only (for the cache)."""
        return {a: getattr(self, a) for a in self.algos}

    def civitai(self) -> Dict[str, str]:
        """The names and upper-case hex Civitai shows on a file (only those computed)."""
        out: Dict[str, str] = {}
        if self.autov1:
            out["AutoV1"] = self.autov1.upper()
        if self.sha256:
            out["AutoV2"] = self.autov2.upper()
            out["SHA256"] = self.sha256.upper()
        if self.autov3:
            out["AutoV3"] = self.autov3.upper()
        if self.crc32:
            out["CRC32"] = self.crc32.upper()
        if self.blake3:
            out["BLAKE3"] = self.blake3.upper()
        return out


# ------------------------------------------------------------------------------------------------ sinks

class _Sink(abc.ABC):
    """One algorithm fed with consecutive file chunks (``update(view, file_offset)``)."""

    name = ""

    @abc.abstractmethod
    def update(self, mv: memoryview, pos: int) -> None:
        """Feed the bytes ``mv`` that start at file offset ``pos``."""

    @abc.abstractmethod
    def result(self) -> Optional[str]:
        """The hex digest (None where the algorithm does not apply to this file)."""


class _Sha256(_Sink):
    name = "sha256"

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, mv: memoryview, pos: int) -> None:
        self.h.update(mv)

    def result(self) -> Optional[str]:
        return self.h.hexdigest()


class _Range(_Sink):
    """sha256 of the bytes in ``[start, end)`` of the file (``end=None``: to the end)."""

    def __init__(self, name: str, start: int, end: Optional[int]) -> None:
        self.name = name
        self.start, self.end = start, end
        self.h = hashlib.sha256()

    def update(self, mv: memoryview, pos: int) -> None:
        lo = max(self.start - pos, 0)
        hi = len(mv) if self.end is None else min(self.end - pos, len(mv))
        if hi > lo:
            self.h.update(mv[lo:hi])


class _AutoV1(_Range):
    def __init__(self) -> None:
        super().__init__("autov1", AUTOV1_OFFSET, AUTOV1_OFFSET + AUTOV1_LENGTH)

    def result(self) -> Optional[str]:
        return self.h.hexdigest()[:8]


class _AutoV3(_Range):
    def __init__(self, data_start: Optional[int]) -> None:
        super().__init__("autov3", data_start or 0, None)
        self.valid = data_start is not None

    def update(self, mv: memoryview, pos: int) -> None:
        if self.valid:
            super().update(mv, pos)

    def result(self) -> Optional[str]:
        return self.h.hexdigest() if self.valid else None


class _Blake3(_Sink):
    name = "blake3"

    def __init__(self, max_threads: Optional[int] = 1) -> None:
        """``max_threads``: threads to split each buffer over (``None``: as many as the package likes)."""
        try:
            import blake3  # PyPI blake3 (Rust bindings); releases the GIL on large updates
        except ImportError:
            raise MissingDependencyError(BLAKE3_MISSING) from None

        self.h = blake3.blake3(max_threads=blake3.blake3.AUTO if max_threads is None else max_threads)

    def update(self, mv: memoryview, pos: int) -> None:
        self.h.update(mv)

    def result(self) -> Optional[str]:
        return self.h.hexdigest()


class _Crc32(_Sink):
    name = "crc32"

    def __init__(self, fn: Optional[Callable[[Any, int], int]] = None) -> None:
        self.v = 0
        self.fn = fn or crc32_backend()[1]

    def update(self, mv: memoryview, pos: int) -> None:
        self.v = self.fn(mv, self.v)

    def result(self) -> Optional[str]:
        return f"{self.v & 0xFFFFFFFF:08x}"


@functools.lru_cache(maxsize=None)
def crc32_backend() -> Tuple[str, Callable[[Any, int], int]]:
    """(name, function) of the CRC-32 used: ISA-L's (optional PyPI ``isal``) where it imports, else ``zlib.crc32``."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        return "zlib", zlib.crc32
    return "isal", crc32


def safetensors_data_start(head: bytes, size: int) -> Optional[int]:
    """Where a safetensors file's tensor data starts (8 + header length), or None if ``head`` is not one."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or 8 + n > size:
        return None
    return 8 + n


#: the whole-file algorithms, each the work of one lane (AutoV1, 64 KiB of the file, rides with the cheapest)
_WHOLE_FILE = ("sha256", "autov3", "blake3", "crc32")


def lane_plan(algos: Sequence[str]) -> List[Tuple[str, ...]]:
    """The worker threads for ``algos`` (names in :data:`ALGORITHMS`): every whole-file algorithm on its own
    thread (sha256 and AutoV3 cost 0.75 s of CPU per GiB here, BLAKE3 0.4, CRC32 0.1 with ISA-L or 0.35 with zlib:
    none may wait behind another where a core is free); AutoV1 (64 KiB) rides with CRC32, the cheapest, else has
    a lane of its own."""
    whole = [a for a in _WHOLE_FILE if a in algos]
    lanes: List[Tuple[str, ...]] = [(a,) for a in whole]
    if "autov1" in algos:
        if "crc32" in whole:
            i = whole.index("crc32")
            lanes[i] = lanes[i] + ("autov1",)
        else:
            lanes.append(("autov1",))
    return lanes


def _lanes(sinks: List[_Sink]) -> List[List[_Sink]]:
    """The sinks grouped by :func:`lane_plan`."""
    by_name = {s.name: s for s in sinks}
    return [[by_name[a] for a in lane] for lane in lane_plan([s.name for s in sinks])]


def _make_sinks(wanted: Sequence[str], head: bytes, size: int) -> List[_Sink]:
    sinks: List[_Sink] = []
    for a in wanted:
        if a == "sha256":
            sinks.append(_Sha256())
        elif a == "autov1":
            sinks.append(_AutoV1())
        elif a == "autov3":
            sinks.append(_AutoV3(safetensors_data_start(head, size)))
        elif a == "blake3":
            # BLAKE3 is the one algorithm that splits a buffer over threads; worth it only when no sha256 lane is
            # slower anyway (else its extra threads take the cores the sha256 lanes need)
            sinks.append(_Blake3(max_threads=1 if {"sha256", "autov3"} & set(wanted) else None))
        elif a == "crc32":
            sinks.append(_Crc32())
    return sinks


def _aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer to ``readinto``. Not a bytearray: its data starts 16 bytes past a page
    boundary, and the kernel's copy from the page cache into a destination so misaligned costs about 3x the CPU
    (0.47 against 0.16 s per GiB measured here, AMD EPYC) -- more than CRC32 and BLAKE3 together."""
    return mmap.mmap(-1, max(size, 1))


def _release(views: Sequence[memoryview], bufs: Sequence[mmap.mmap]) -> None:
    for v in views:
        try:
            v.release()
        except BufferError:
            pass
    for b in bufs:
        try:
            b.close()
        except BufferError:  # a view still held somewhere (an exception's traceback): the GC unmaps it later
            pass


# ------------------------------------------------------------------------------------------------ the pass

def _stat_key(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    # ctime too: a write whose mtime was set back (rsync -t, cp -p, touch -d) still moves ctime
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)


def hash_file(path: PathLike, algos: Optional[Iterable[str]] = None, chunk_size: int = DEFAULT_CHUNK,
              progress: Optional[ProgressFn] = None, threads: Optional[bool] = None) -> FileHashes:
    """Compute the chosen hashes (default: all five) of ``path`` in one read.

    ``progress(done_bytes, total_bytes)`` is called after each chunk (from the calling thread). ``threads``
    forces (True) or forbids (False) worker threads; by default they are used for files over 32 MiB.
    Raises ``FileNotFound`` / ``ModelFileError`` for missing or unreadable files.
    """
    wanted = normalize_algos(algos)
    p = Path(path)
    if chunk_size < 4096:
        raise InvalidInputError("chunk_size must be at least 4096 bytes")
    fh = open_regular(p, buffering=0)  # a FIFO or a device (endless bytes) is refused before it can block
    with fh:
        st0 = os.fstat(fh.fileno())
        size = st0.st_size
        if hasattr(os, "posix_fadvise"):
            try:  # a larger read-ahead window on a cold cache
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        use_threads = threads if threads is not None else size >= _THREAD_MIN_BYTES
        threaded = bool(use_threads) and size > chunk_size
        nlanes = len(lane_plan(wanted))
        # buffers: one per lane in flight, one being read, one spare; one buffer without threads
        bufs = [_aligned_buffer(min(chunk_size, size) if not threaded else chunk_size)
                for _ in range(nlanes + 2 if threaded else 1)]
        views = [memoryview(b) for b in bufs]
        try:
            try:
                n_first = fh.readinto(views[0])
            except OSError as e:
                raise ModelFileError(f"cannot read: {e.strerror or e}", p) from None
            sinks = _make_sinks(wanted, bytes(views[0][:min(n_first, 9)]), size)
            try:
                if threaded and n_first:
                    done = _threaded(fh, views, n_first, _lanes(sinks), size, progress)
                else:
                    done = _inline(fh, views[0], n_first, sinks, size, progress)
            except OSError as e:
                raise ModelFileError(f"cannot read: {e.strerror or e}", p) from None
        finally:
            _release(views, bufs)
        st_fd = os.fstat(fh.fileno())
    try:
        st1 = os.stat(p)
    except OSError:
        st1 = None
    changed = (st1 is None or _stat_key(st1) != _stat_key(st0) or _stat_key(st_fd) != _stat_key(st0)
               or done != size)
    res = FileHashes(path=str(p), size=size, mtime=st0.st_mtime, mtime_ns=st0.st_mtime_ns, changed=changed,
                     algos=wanted)
    for s in sinks:
        setattr(res, s.name, s.result())
    return res


def _inline(fh, view: memoryview, n_first: int, sinks: Sequence[_Sink], size: int,
            progress: Optional[ProgressFn]) -> int:
    pos = 0
    n = n_first
    while n:
        mv = view[:n]
        for s in sinks:
            s.update(mv, pos)
        mv.release()
        pos += n
        if progress is not None:
            progress(pos, size)
        n = fh.readinto(view)
    return pos


def _threaded(fh, views: List[memoryview], n_first: int, lanes: List[List[_Sink]], size: int,
              progress: Optional[ProgressFn]) -> int:
    """Reader (this thread) fills the reused buffers ``views`` (the first already holds ``n_first`` bytes); one
    worker per lane hashes them in file order; a buffer goes back to the reader when every lane is done with it."""
    nbuf = len(views)
    free: "queue.Queue[int]" = queue.Queue()
    for i in range(1, nbuf):
        free.put(i)
    pending = [0] * nbuf
    lock = threading.Lock()
    work: List["queue.Queue[Optional[Tuple[int, int, int]]]"] = [queue.Queue() for _ in lanes]
    errors: List[BaseException] = []

    def worker(lane: List[_Sink], q: "queue.Queue[Optional[Tuple[int, int, int]]]") -> None:
        while True:
            item = q.get()
            if item is None:
                return
            idx, n, pos = item
            try:
                if not errors:
                    with views[idx][:n] as mv:
                        for s in lane:
                            s.update(mv, pos)
            except BaseException as e:  # noqa: BLE001 - re-raised in the reader
                errors.append(e)
            with lock:
                pending[idx] -= 1
                last = pending[idx] == 0
            if last:
                free.put(idx)

    ts = [threading.Thread(target=worker, args=(lane, q), daemon=True, name=f"sdtoolkit-hash-{i}")
          for i, (lane, q) in enumerate(zip(lanes, work))]
    for t in ts:
        t.start()
    pos = 0
    try:
        idx = 0
        n = n_first
        while n:
            pending[idx] = len(lanes)
            for q in work:
                q.put((idx, n, pos))
            pos += n
            if progress is not None:
                progress(pos, size)
            if errors:
                break
            idx = free.get()
            n = fh.readinto(views[idx])
    finally:
        for q in work:
            q.put(None)
        for t in ts:
            t.join()
    if errors:
        raise errors[0]
    return pos


def sha256_file(path: PathLike, progress: Optional[ProgressFn] = None) -> str:
    """The whole-file sha256 (lower-case hex), as ``sha256sum`` prints it. Raises if the file changed meanwhile."""
    res = hash_file(path, ("sha256",), progress=progress)
    if res.changed:
        raise ModelFileError("the file changed while it was hashed; try again", path)
    return res.sha256  # type: ignore[return-value]


def legacy_model_hash(path: PathLike) -> str:
    """AutoV1 alone (reads only 64 KiB): the WebUI's old 8-hex ``model_hash``."""
    try:
        with open_regular(path) as fh:
            fh.seek(AUTOV1_OFFSET)
            return hashlib.sha256(fh.read(AUTOV1_LENGTH)).hexdigest()[:8]
    except OSError as e:
        raise ModelFileError(f"cannot read: {e.strerror or e}", path) from None


__all__ = ["ALGORITHMS", "ALGO_ALIASES", "FileHashes", "hash_file", "sha256_file", "legacy_model_hash",
           "normalize_algos", "safetensors_data_start", "DEFAULT_CHUNK"]
