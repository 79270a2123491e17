"""Lazy readers for model files.

``open_model(path)`` gives keys, shapes, dtypes and single tensors without loading the whole file:

* ``.safetensors``: the header is parsed and checked here (so a truncated file or a header that lies about
  offsets or shapes gets a clear message), tensors come through ``safetensors.safe_open`` (mmap).
* ``.ckpt/.pt/.pth/.bin``: ``torch.load(weights_only=True, mmap=True)`` where the zip format allows (mmap
  means tensor data is only paged in when used), unwrapping a ``state_dict`` nesting and keeping the
  other top-level fields as string metadata.

The format is sniffed from the first bytes, not trusted from the suffix.

Bad input never escapes as the library's own exception: whatever ``json``, ``struct``, ``zipfile``, ``pickle``,
``torch.load`` or ``safetensors`` raise becomes a ``ModelFileError`` naming the file. Limits (documented sanity
bounds, far above real files; an SDXL checkpoint has ~2.5k tensors, a Flux all-in-one ~1.7k, big LoRAs ~10k):

* :data:`MAX_TENSORS` tensors per file (more is refused before the header is parsed);
* :data:`MAX_HEADER_BYTES` of safetensors header, nested at most :data:`MAX_HEADER_DEPTH` levels (the format
  needs 3);
* non-tensor checkpoint fields are kept as metadata strings of at most :data:`MAX_FIELD_CHARS` characters, shown
  :data:`MAX_FIELD_DEPTH` levels deep (deeper parts are summarised), at most :data:`MAX_FIELDS` of them.

Only regular files are opened (``files.regular``): a FIFO, a device, a socket or a symlink loop is refused before
any read.
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import ModelFileError, SdToolkitError, UnsafeFileError
from .regular import check_regular, open_regular

PathLike = Union[str, "os.PathLike[str]"]

#: safetensors dtype names <-> torch dtypes
ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_ST: Dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: a safetensors header larger than this is refused (the format's own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000
#: more tensors than this in one file is refused (10x the largest real LoRA; a 1M-tensor header would take
#: tens of seconds and gigabytes to parse)
MAX_TENSORS = 100_000
#: JSON nesting allowed in a safetensors header (the format itself needs 3: header / entry / shape list)
MAX_HEADER_DEPTH = 16
#: non-tensor checkpoint fields: levels shown, characters kept per field, fields kept
MAX_FIELD_DEPTH = 8
MAX_FIELD_CHARS = 65536
MAX_FIELDS = 1000
#: a checkpoint's pickle (not its tensor data) larger than this is refused: torch's weights_only unpickler runs
#: in Python at ~10-40 us per opcode (an SDXL checkpoint's pickle is ~0.3 MB)
MAX_PICKLE_BYTES = 16 << 20
#: the pickle's stack may not hold more than this (pickle batches 1000 dict items, i.e. ~2000 stack entries;
#: a list nested 200k deep pushes 200k and would take the unpickler minutes)
MAX_PICKLE_STACK = 10_000

_DTYPE_SIZE: Dict[torch.dtype, int] = {}


def dtype_size(dtype: torch.dtype) -> int:
    size = _DTYPE_SIZE.get(dtype)
    if size is None:
        size = _DTYPE_SIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


def one_line(text: str, limit: int = 300) -> str:
    """A library's error text as one short line (control characters escaped)."""
    line = " ".join(str(text).split())
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text (strings ignored), without recursion."""
    import numpy as np

    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, dtype=np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int32) * 2 - 1
    return int(np.cumsum(step).max())


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    """What the header says of one tensor."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    nbytes: int
    offset: Optional[int] = None  # byte offset in the file (safetensors only)

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


class ModelReader(abc.ABC):
    """Base class of the lazy readers. Use as a context manager."""

    format: str = ""

    def __init__(self, path: Path):
        self.path = path
        self.file_size = check_regular(path).st_size
        self.metadata: Dict[str, str] = {}
        self._infos: Dict[str, TensorInfo] = {}

    # mapping-like access -------------------------------------------------------------------
    def keys(self) -> List[str]:
        return list(self._infos)

    def infos(self) -> Dict[str, TensorInfo]:
        return dict(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise ModelFileError("no such tensor in this file", self.path, key) from None

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, owned by the caller."""

    #: True where :meth:`read_into` reads only the asked range from the file (so reading a large tensor in chunks
    #: costs no more than reading it whole)
    ranged_reads: bool = False

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Copy elements ``[start, start + out.numel())`` of tensor ``key`` (flattened, stored dtype) into ``out``,
        a contiguous CPU tensor of that dtype; returns ``out``. This generic form reads the whole tensor (readers
        with :attr:`ranged_reads` read only the range)."""
        self._check_range(key, out, start)
        n = out.numel()
        if n:
            out.view(-1).copy_(self.get(key).reshape(-1)[start:start + n])
        return out

    def read_elements(self, key: str, start: int = 0, count: Optional[int] = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``key`` (default: all of it) as a new flat CPU tensor of
        the stored dtype, owned by the caller."""
        info = self.info(key)
        if count is None:
            count = info.numel - start
        return self.read_into(key, torch.empty(max(int(count), 0), dtype=info.dtype), start)

    def _check_range(self, key: str, out: torch.Tensor, start: int) -> TensorInfo:
        info = self.info(key)
        if out.dtype != info.dtype or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"read_into needs a contiguous CPU {info.dtype} tensor, got {out.dtype} on "
                             f"{out.device} (contiguous: {out.is_contiguous()})")
        if start < 0 or start + out.numel() > info.numel:
            raise ValueError(f"elements [{start}, {start + out.numel()}) are outside {key!r} ({info.numel} elements)")
        return info

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for k in self._infos:
            yield k, self.get(k)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({len(self)} tensors)>"


def _read_header_bytes(path: Path, file_size: int, fh) -> bytes:
    """The JSON header's bytes (after the 8-byte length), with the length checked against the file."""
    head = fh.read(8)
    if len(head) < 8:
        raise ModelFileError("truncated safetensors file (shorter than its 8-byte header length)", path)
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES:
        raise ModelFileError(f"not a safetensors file (header length {n} is not plausible; at most "
                             f"{MAX_HEADER_BYTES} bytes are accepted)", path)
    if 8 + n > file_size:
        raise ModelFileError(
            f"truncated safetensors file: header says {n} header bytes but the file has only {file_size - 8}", path)
    raw = fh.read(n)
    if len(raw) != n:
        raise ModelFileError(f"truncated safetensors file: could read only {len(raw)} of {n} header bytes", path)
    return raw


def _parse_header_bytes(path: Path, file_size: int, raw: bytes
                        ) -> Tuple[int, Dict[str, TensorInfo], Dict[str, str]]:
    """Validate a safetensors header's bytes. Returns (data_start, infos in offset order, metadata)."""
    n = len(raw)
    if raw[:1] != b"{":
        raise ModelFileError("not a safetensors file (the header does not start with '{')", path)
    # refuse before parsing what would be slow or deep to parse (counts and depth run in C / numpy)
    count = raw.count(b'"data_offsets"')
    if count > MAX_TENSORS:
        raise ModelFileError(f"the header lists {count} tensors; at most {MAX_TENSORS} are accepted (real models "
                             f"have a few thousand)", path)
    depth = json_depth(raw)
    if depth > MAX_HEADER_DEPTH:
        raise ModelFileError(f"not a safetensors file (the header JSON is nested {depth} levels deep; at most "
                             f"{MAX_HEADER_DEPTH} are accepted)", path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"not a safetensors file (header is not JSON: {one_line(str(e), 120)})", path) from None
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise ModelFileError("not a safetensors file (the header JSON is nested too deeply)", path) from None
    if not isinstance(header, dict):
        raise ModelFileError("not a safetensors file (header is not a JSON object)", path)
    data_start = 8 + n
    data_size = file_size - data_start
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict):
        raise ModelFileError("safetensors __metadata__ is not an object", path)
    metadata: Dict[str, str] = {}
    for k, v in meta_raw.items():
        v = v if isinstance(v, str) else json.dumps(v)
        if not (_valid_text(k) and _valid_text(v)):
            raise ModelFileError("safetensors __metadata__ holds text that is not valid Unicode (a lone "
                                 "surrogate escape)", path)
        metadata[k] = v
    if len(header) > MAX_TENSORS:  # pragma: no cover - counted above (an entry without data_offsets is refused)
        raise ModelFileError(f"the header lists {len(header)} tensors; at most {MAX_TENSORS} are accepted", path)
    infos: List[TensorInfo] = []
    # only a \uD800-\uDFFF escape in the raw header can give a name that is not valid Unicode
    surrogates = b"\\ud" in raw or b"\\uD" in raw
    # the checks below run once per tensor (thousands per file, every time a file is opened): plain loops and
    # type() tests, no generator per entry
    for name, spec in header.items():
        if surrogates and not _valid_text(name):
            raise ModelFileError(f"a tensor name is not valid Unicode ({ascii(name)[:80]})", path)
        if type(spec) is not dict:
            raise ModelFileError("header entry is not an object", path, name)
        dt_name = spec.get("dtype")
        dt = ST_DTYPES.get(dt_name) if type(dt_name) is str else None
        if dt is None:
            raise ModelFileError(f"unknown dtype {one_line(json.dumps(dt_name), 60)} in header", path, name)
        shape = spec.get("shape")
        offs = spec.get("data_offsets")
        count = 1
        if type(shape) is list:
            for s in shape:
                if type(s) is not int or s < 0:
                    count = -1
                    break
                count *= s
        if type(shape) is not list or count < 0:
            raise ModelFileError(f"bad shape {one_line(json.dumps(shape), 80)} in header", path, name)
        if (type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int
                or not 0 <= offs[0] <= offs[1]):
            raise ModelFileError(f"bad data_offsets {one_line(json.dumps(offs), 80)} in header", path, name)
        nbytes = count * dtype_size(dt)   # dtype_size keeps its own table
        if offs[1] - offs[0] != nbytes:
            shown = one_line(str(shape), 80)
            raise ModelFileError(
                f"header lies: shape {shown} of {dt_name} needs {nbytes if nbytes < 10**30 else 'too many'} bytes "
                f"but data_offsets span {offs[1] - offs[0]}", path, name)
        if offs[1] > data_size:
            raise ModelFileError(
                f"truncated or lying file: tensor data ends at byte {data_start + offs[1]} but the file has "
                f"{file_size} bytes", path, name)
        infos.append(TensorInfo(name, dt, tuple(shape), nbytes, data_start + offs[0]))
    infos.sort(key=lambda i: (i.offset, i.name))
    end = data_start
    for i in infos:
        if i.offset < end and i.nbytes:
            raise ModelFileError("header lies: tensor data regions overlap", path, i.name)
        end = max(end, i.offset + i.nbytes)
    return data_start, {i.name: i for i in infos}, metadata


#: headers parsed last, by their bytes' digest and the file's size (what the parse depends on): a file is opened
#: many times (listed, inspected, its architecture found, then merged) and an SD1.5 header of 1,131 tensors takes
#: 10-25 ms to parse and check against 0.2 ms to digest; keyed by content, a file changed in place, or a new file
#: on a reused inode, is never taken for the old one
HEADER_CACHE_SIZE = 64
_HEADERS: "OrderedDict[tuple, Tuple[int, Dict[str, TensorInfo], Dict[str, str]]]" = OrderedDict()
_HEADERS_LOCK = threading.Lock()


def _cached_header(path: Path, file_size: int, fh) -> Tuple[int, Dict[str, TensorInfo], Dict[str, str]]:
    raw = _read_header_bytes(path, file_size, fh)
    key = (file_size, len(raw), hashlib.blake2b(raw, digest_size=20).digest())
    with _HEADERS_LOCK:
        hit = _HEADERS.get(key)
        if hit is not None:
            _HEADERS.move_to_end(key)
    if hit is None:
        hit = _parse_header_bytes(path, file_size, raw)
        with _HEADERS_LOCK:
            _HEADERS[key] = hit
            while len(_HEADERS) > HEADER_CACHE_SIZE:
                _HEADERS.popitem(last=False)
    data_start, infos, metadata = hit
    return data_start, dict(infos), dict(metadata)  # callers may change their own dicts, never the cached ones


#: ``os.preadv`` where the OS has it (not on Windows)
_PREADV = getattr(os, "preadv", None)


class SafetensorsReader(ModelReader):
    """``get`` maps the file (``safetensors.safe_open``); ``read_into`` / ``read_elements`` read the tensor's
    bytes with ``os.preadv`` straight into the caller's buffer instead, so file pages are never mapped into the
    process (they stay in the page cache, not in its memory) and any range of a tensor costs only its bytes. The
    descriptor is opened once (regular files only) and shared: ``preadv`` has no file position, so threads may read
    at the same time."""

    format = "safetensors"
    ranged_reads = True

    def __init__(self, path: Path):
        super().__init__(path)
        with open_regular(path) as fh:
            self.data_start, self._infos, self.metadata = _cached_header(path, self.file_size, fh)
        self._handle = None
        self._fh: Optional[Any] = None
        self._fh_lock = threading.Lock()

    def _fd(self) -> int:
        with self._fh_lock:
            if self._fh is None:
                self._fh = open_regular(self.path, buffering=0)
            return self._fh.fileno()

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        info = self._check_range(key, out, start)
        if out.numel() == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        self._pread(buf, info.offset + start * out.element_size(), key)
        return out

    def read_span_into(self, keys: Sequence[str], out: torch.Tensor) -> None:
        """Read the bytes of the tensors ``keys``, which lie next to each other in the file in this order, with one
        read into ``out`` (a uint8 CPU tensor of exactly their size): tensor k's bytes start at
        ``info(k).offset - info(keys[0]).offset``."""
        infos = [self.info(k) for k in keys]
        pos = infos[0].offset
        for i in infos:
            if i.offset != pos:
                raise ValueError(f"{i.name!r} does not follow the tensor before it in {self.path.name}")
            pos += i.nbytes
        if out.dtype != torch.uint8 or out.numel() != pos - infos[0].offset or not out.is_contiguous():
            raise ValueError(f"read_span_into needs a contiguous uint8 tensor of {pos - infos[0].offset} bytes")
        if out.numel():
            self._pread(memoryview(out.numpy()).cast("B"), infos[0].offset, keys[0])

    def _pread(self, buf: memoryview, pos: int, key: str) -> None:
        fd = self._fd()
        got = 0
        try:
            while got < len(buf):
                if _PREADV is not None:
                    n = _PREADV(fd, [buf[got:]], pos + got)
                else:  # Windows has no pread: seek + read under the lock
                    with self._fh_lock:
                        self._fh.seek(pos + got)
                        n = self._fh.readinto(buf[got:])
                if not n:
                    raise ModelFileError("unexpected end of file while reading the tensor (truncated?)", self.path,
                                         key)
                got += n
        except OSError as e:
            raise ModelFileError(f"cannot read: {e.strerror or e}", self.path, key) from None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            check_regular(self.path)
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ModelFileError(f"cannot open safetensors file: {one_line(str(e))}", self.path) from None
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        self.info(key)
        handle = self._open()
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise ModelFileError(f"cannot read tensor: {one_line(str(e))}", self.path, key) from None

    def close(self) -> None:
        self._handle = None
        with self._fh_lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


class _Placeholder:
    """Stands in for harmless training-time objects found in real SD checkpoints (see _ALLOWED_GLOBALS)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _placeholder(module: str, qualname: str) -> type:
    cls = type(qualname, (_Placeholder,), {})
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls


#: Real SD1.x checkpoints pickle a pytorch_lightning ModelCheckpoint callback. It is data only; we let
#: weights_only load it as an inert placeholder instead of refusing the whole file.
_ALLOWED_GLOBALS = [
    _placeholder("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
]


def _unsafe_globals(path: Path) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


class _Summary:
    """Bounded, recursion-limited JSON rendering of a non-tensor checkpoint field."""

    def __init__(self) -> None:
        self.out: List[str] = []
        self.size = 0

    def emit(self, text: str) -> None:
        if self.size <= MAX_FIELD_CHARS:
            self.out.append(text)
            self.size += len(text)

    def walk(self, value: Any, depth: int) -> None:
        if self.size > MAX_FIELD_CHARS:
            return
        if isinstance(value, str):
            self.emit(json.dumps(value[:MAX_FIELD_CHARS]))
        elif value is None or isinstance(value, (bool, int)):
            self.emit(json.dumps(value))
        elif isinstance(value, float):
            self.emit(json.dumps(value) if math.isfinite(value) else json.dumps(str(value)))
        elif isinstance(value, torch.Tensor):
            self.emit(json.dumps(value.item()) if value.numel() == 1 and not value.is_complex()
                      else json.dumps(f"<Tensor {list(value.shape)}>"))
        elif isinstance(value, (list, tuple, dict)):
            kind = type(value).__name__
            if depth >= MAX_FIELD_DEPTH:
                self.emit(json.dumps(f"<{kind} nested deeper than {MAX_FIELD_DEPTH} levels>"))
                return
            items = value.items() if isinstance(value, dict) else value
            self.emit("{" if isinstance(value, dict) else "[")
            for i, item in enumerate(items):
                if self.size > MAX_FIELD_CHARS:
                    break
                if i:
                    self.emit(", ")
                if isinstance(value, dict):
                    k, v = item
                    self.emit(json.dumps(k if isinstance(k, str) else str(k)[:200]) + ": ")
                    self.walk(v, depth + 1)
                else:
                    self.walk(item, depth + 1)
            self.emit("}" if isinstance(value, dict) else "]")
        else:
            self.emit(json.dumps(f"<{type(value).__name__}>"))

    def text(self) -> str:
        s = "".join(self.out)
        return s if len(s) <= MAX_FIELD_CHARS else s[:MAX_FIELD_CHARS] + "...(cut)"


def _stringify(value: Any) -> Optional[str]:
    """A non-tensor checkpoint field as a metadata string (bounded in depth and size; never recursive beyond
    :data:`MAX_FIELD_DEPTH`)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS] + "...(cut)"
    if isinstance(value, (int, float, bool, list, tuple, dict, torch.Tensor)) or value is None:
        s = _Summary()
        s.walk(value, 0)
        return s.text()
    return f"<{type(value).__name__}>"


def _scan_pickle(stream, path: Path) -> None:
    """Walk one pickle's opcodes (no object is built) and refuse a stack higher than :data:`MAX_PICKLE_STACK`.

    Stops at the pickle's STOP, leaving ``stream`` after it. Raises ``ModelFileError`` for corrupt opcodes."""
    import pickletools

    depth = 0
    marks: List[int] = []
    try:
        for op, _arg, _pos in pickletools.genops(stream):
            before, after = op.stack_before, op.stack_after
            if op.name == "MARK":
                marks.append(depth)
                continue
            if pickletools.markobject in before:
                base = marks.pop() if marks else 0
                depth = base - before.index(pickletools.markobject) + len(after)
            else:
                depth += len(after) - len(before)
            if depth > MAX_PICKLE_STACK or len(marks) > MAX_PICKLE_STACK:
                raise ModelFileError(f"the checkpoint's pickle stacks more than {MAX_PICKLE_STACK} objects (a "
                                     f"structure nested that deep); refused, real checkpoints stay near 2000", path)
    except SdToolkitError:
        raise
    except Exception as e:  # noqa: BLE001 - pickletools raises ValueError/EOFError... on bytes that are no pickle
        raise ModelFileError(f"corrupt checkpoint (its pickle does not parse: {one_line(str(e), 160)})",
                             path) from None


def _precheck_pickle(path: Path, zipped: bool) -> None:
    """Bound the pickle of a checkpoint before ``torch.load`` runs it: size and nesting."""
    if zipped:
        with zipfile.ZipFile(path) as zf:
            names = [i for i in zf.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not names:
                return  # torch.load says what is missing
            info = names[0]
            if info.file_size > MAX_PICKLE_BYTES:
                raise ModelFileError(f"the checkpoint's pickle is {info.file_size} bytes; at most "
                                     f"{MAX_PICKLE_BYTES} are accepted", path)
            _scan_pickle(io.BytesIO(zf.read(info)), path)
        return
    with open_regular(path) as fh:
        # legacy format: magic number, protocol version, system info, then the object; tensor data follows
        for _ in range(4):
            start = fh.tell()
            _scan_pickle(fh, path)
            if fh.tell() - start > MAX_PICKLE_BYTES:
                raise ModelFileError(f"the checkpoint's pickle is over {MAX_PICKLE_BYTES} bytes; refused", path)


class CkptReader(ModelReader):
    """PyTorch pickles through ``torch.load(weights_only=True)``, memory-mapped where the zip format allows."""

    format = "ckpt"

    def __init__(self, path: Path):
        super().__init__(path)
        obj = self._load(path)
        if not isinstance(obj, Mapping):
            raise ModelFileError(f"not a model: the pickle holds a {type(obj).__name__}, not a dict of tensors", path)
        sd: Mapping[str, Any] = obj
        extra: Dict[str, Any] = {}
        if isinstance(obj.get("state_dict"), Mapping):
            sd = obj["state_dict"]
            extra = {k: v for k, v in obj.items() if k != "state_dict"}
        self._tensors: Dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                self._tensors[str(k)] = v
            elif len(extra) < MAX_FIELDS:
                extra[f"state_dict.{k}"] = v
        if len(self._tensors) > MAX_TENSORS:
            raise ModelFileError(f"the checkpoint holds {len(self._tensors)} tensors; at most {MAX_TENSORS} are "
                                 f"accepted", path)
        for k, v in list(extra.items())[:MAX_FIELDS]:
            s = _stringify(v)
            if s is not None:
                self.metadata[str(k)[:200]] = s
        self._infos = {
            k: TensorInfo(k, t.dtype, tuple(t.shape), t.numel() * t.element_size(), None)
            for k, t in self._tensors.items()
        }

    @staticmethod
    def _load(path: Path) -> Any:
        try:
            check_regular(path)
            zipped = zipfile.is_zipfile(path)
            _precheck_pickle(path, zipped)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about odd pickle protocols on stderr
                with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
                    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
        except SdToolkitError:
            raise
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "unsupported operand" in msg.lower():  # weights_only met an opcode byte that is no opcode
                raise ModelFileError(f"corrupt checkpoint (unpickling failed: {one_line(_first(msg), 200)})",
                                     path) from None
            if "Weights only load failed" in msg or "Unsupported global" in msg or "unsupported" in msg.lower():
                names = _unsafe_globals(path) if _is_zip(path) else []
                what = f" ({', '.join(names[:5])})" if names else ""
                raise UnsafeFileError(
                    "refused: this pickle would import or run code" + what +
                    "; only plain tensors load with weights_only=True. Convert it to .safetensors with a trusted tool.",
                    path) from None
            raise ModelFileError(f"not a PyTorch checkpoint (unpickling failed: {one_line(_first(msg), 200)})",
                                 path) from None
        except MemoryError:
            raise ModelFileError("not enough memory to load this checkpoint (or it claims an absurd size)",
                                 path) from None
        except RecursionError:
            raise ModelFileError("corrupt checkpoint (nested too deeply to load)", path) from None
        except Exception as e:  # noqa: BLE001 - torch.load raises whatever the corrupt bytes lead to
            first = one_line(_first(str(e)) or type(e).__name__, 200)
            if isinstance(e, (EOFError, struct.error)) or "truncat" in first.lower() \
                    or "central directory" in first.lower():
                raise ModelFileError(f"truncated or corrupt checkpoint ({type(e).__name__}: {first})", path) from None
            raise ModelFileError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {first})", path) from None

    def get(self, key: str) -> torch.Tensor:
        self.info(key)
        try:
            return self._tensors[key].clone()
        except Exception as e:  # noqa: BLE001 - an mmap-backed storage whose bytes are gone
            raise ModelFileError(f"cannot read tensor: {one_line(str(e))}", self.path, key) from None

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        self._check_range(key, out, start)
        n = out.numel()
        try:
            if n:
                out.view(-1).copy_(self._tensors[key].reshape(-1)[start:start + n])
        except Exception as e:  # noqa: BLE001 - an mmap-backed storage whose bytes are gone
            raise ModelFileError(f"cannot read tensor: {one_line(str(e))}", self.path, key) from None
        return out

    def close(self) -> None:
        self._tensors = {}


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - zipfile raises BadZipFile, struct.error... on corrupt end records
        return False


def _first(msg: str) -> str:
    """The telling line of a library's message (torch's weights_only errors put it after a long preamble)."""
    for line in msg.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return (msg.splitlines() or [""])[0]


#: the first bytes of a GGUF file (llama.cpp's format; ComfyUI-GGUF and Forge load quantized Flux/SDXL from it)
GGUF_MAGIC = b"GGUF"


def gguf_error(path: Path) -> ModelFileError:
    """The one message every tool gives for a ``.gguf`` file."""
    return ModelFileError("GGUF files are not supported (quantized weights in llama.cpp's GGUF format, which "
                          "ComfyUI-GGUF and Forge load); use a .safetensors copy of the model (bf16, fp16 or fp8)",
                          path)


def _sniff(path: Path) -> str:
    with open_regular(path) as fh:
        head = fh.read(16)
    if head[:4] == GGUF_MAGIC or path.suffix.lower() == ".gguf":
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "ckpt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if len(head) >= 9:
        # a safetensors file whose header does not start with '{' (invalid, refused by the header parser) must
        # not be handed to torch.load because its length's first byte happens to be 0x80
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= MAX_HEADER_BYTES and head[8:9] in (b" ", b"\t", b"\r", b"\n", b"["):
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # legacy pickle, protocol 2+
        return "ckpt"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    return "unknown"


def open_model(path: PathLike) -> ModelReader:
    """Open a model file lazily. Raises ``ModelFileError`` (with the path and the reason) on bad input, whatever
    the library underneath raised."""
    p = Path(path)
    st = check_regular(p)  # missing, a folder, a FIFO, a device, a socket, a symlink loop: refused here
    if st.st_size == 0:
        raise ModelFileError("empty file", p)
    try:
        kind = _sniff(p)
        if kind == "safetensors":
            reader: ModelReader = SafetensorsReader(p)
        elif kind == "ckpt":
            reader = CkptReader(p)
        elif kind == "gguf":
            raise gguf_error(p)
        else:
            raise ModelFileError("not a model file (neither safetensors nor a PyTorch checkpoint)", p)
    except SdToolkitError:
        raise
    except OSError as e:
        raise ModelFileError(f"cannot read: {e.strerror or one_line(str(e))}", p) from None
    except MemoryError:
        raise ModelFileError("not enough memory to read this file", p) from None
    except RecursionError:
        raise ModelFileError("malformed file (nested too deeply)", p) from None
    except Exception as e:  # noqa: BLE001 - last net: a reader bug must still name the file, not crash the caller
        raise ModelFileError(f"malformed file ({type(e).__name__}: {one_line(str(e), 200)})", p) from None
    if len(reader) == 0:
        raise ModelFileError("holds no tensors", p)
    return reader


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The whole file as a dict of CPU tensors (use ``open_model`` to stream instead)."""
    with open_model(path) as r:
        return {k: r.get(k) for k in r.keys()}


def read_infos(path: PathLike) -> Tuple[str, Dict[str, TensorInfo], Dict[str, str], int]:
    """(format, infos, metadata, file_size) without keeping the file open."""
    with open_model(path) as r:
        return r.format, r.infos(), dict(r.metadata), r.file_size
