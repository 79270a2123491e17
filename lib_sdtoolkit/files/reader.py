"""Lazy readers for model files.

``open_model(path)`` gives keys, shapes, dtypes and single tensors without loading the whole file:

* ``.safetensors``: the header is parsed and checked here (so a truncated file or a header that lies about
  offsets or shapes gets a clear message), tensors come through ``safetensors.safe_open`` (mmap).
* ``.ckpt/.pt/.pth/.bin``: ``torch.load(weights_only=True, mmap=True)`` where the zip format allows (mmap
  means tensor data is only paged in when used), unwrapping a ``state_dict`` nesting and keeping the
  other top-level fields as string metadata.

The format is sniffed from the first bytes, not trusted from the suffix.
"""
from __future__ import annotations

import abc
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import FileNotFound, ModelFileError, UnsafeFileError

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


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


class ModelReader(abc.ABC):
    """Base class of the lazy readers. Use as a context manager."""

    format: str = ""

    def __init__(self, path: Path):
        self.path = path
        self.file_size = path.stat().st_size
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

    @property
    def tensor_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, owned by the caller."""

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


def parse_safetensors_header(path: Path, file_size: int, fh) -> Tuple[int, Dict[str, TensorInfo], Dict[str, str]]:
    """Read and validate a safetensors header. Returns (data_start, infos in offset order, metadata)."""
    head = fh.read(8)
    if len(head) < 8:
        raise ModelFileError("truncated safetensors file (shorter than its 8-byte header length)", path)
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES:
        raise ModelFileError(f"not a safetensors file (header length {n} is not plausible)", path)
    if 8 + n > file_size:
        raise ModelFileError(
            f"truncated safetensors file: header says {n} header bytes but the file has only {file_size - 8}", path)
    raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"not a safetensors file (header is not JSON: {e})", path) from None
    if not isinstance(header, dict):
        raise ModelFileError("not a safetensors file (header is not a JSON object)", path)
    data_start = 8 + n
    data_size = file_size - data_start
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict):
        raise ModelFileError("safetensors __metadata__ is not an object", path)
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta_raw.items()}
    infos: List[TensorInfo] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise ModelFileError("header entry is not an object", path, name)
        dt = ST_DTYPES.get(spec.get("dtype"))
        if dt is None:
            raise ModelFileError(f"unknown dtype {spec.get('dtype')!r} in header", path, name)
        shape = spec.get("shape")
        offs = spec.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ModelFileError(f"bad shape {shape!r} in header", path, name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ModelFileError(f"bad data_offsets {offs!r} in header", path, name)
        nbytes = int(math.prod(shape)) * dtype_size(dt)
        if offs[1] - offs[0] != nbytes:
            raise ModelFileError(
                f"header lies: shape {shape} of {spec['dtype']} needs {nbytes} bytes but data_offsets span "
                f"{offs[1] - offs[0]}", path, name)
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


class SafetensorsReader(ModelReader):
    format = "safetensors"

    def __init__(self, path: Path):
        super().__init__(path)
        with open(path, "rb") as fh:
            self.data_start, self._infos, self.metadata = parse_safetensors_header(path, self.file_size, fh)
        self._handle = None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ModelFileError(f"cannot open safetensors file: {e}", self.path) from None
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        self.info(key)
        try:
            return self._open().get_tensor(key)
        except Exception as e:
            raise ModelFileError(f"cannot read tensor: {e}", self.path, key) from None

    def read_raw(self, key: str) -> bytes:
        """The tensor's bytes as stored (no dtype conversion)."""
        info = self.info(key)
        with open(self.path, "rb") as fh:
            fh.seek(info.offset)
            return fh.read(info.nbytes)

    def close(self) -> None:
        self._handle = None


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


def _stringify(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)) or value is None:
        return json.dumps(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json.dumps(value.item())
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, default=lambda o: f"<{type(o).__name__}>")
        except (TypeError, ValueError):
            return None
    return f"<{type(value).__name__}>"


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
            else:
                extra[f"state_dict.{k}"] = v
        for k, v in extra.items():
            s = _stringify(v)
            if s is not None:
                self.metadata[str(k)] = s
        self._infos = {
            k: TensorInfo(k, t.dtype, tuple(t.shape), t.numel() * t.element_size(), None)
            for k, t in self._tensors.items()
        }

    @staticmethod
    def _load(path: Path) -> Any:
        zipped = zipfile.is_zipfile(path)
        try:
            with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "Weights only load failed" in msg or "Unsupported global" in msg or "unsupported" in msg.lower():
                names = _unsafe_globals(path) if zipped else []
                what = f" ({', '.join(names[:5])})" if names else ""
                raise UnsafeFileError(
                    "refused: this pickle would import or run code" + what +
                    "; only plain tensors load with weights_only=True. Convert it to .safetensors with a trusted tool.",
                    path) from None
            raise ModelFileError(f"not a PyTorch checkpoint (unpickling failed: {msg.splitlines()[0][:200]})",
                                 path) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            if isinstance(e, EOFError) or "truncat" in first.lower() or "central directory" in first.lower():
                raise ModelFileError(f"truncated or corrupt checkpoint ({first})", path) from None
            raise ModelFileError(f"not a readable PyTorch checkpoint ({first})", path) from None

    def get(self, key: str) -> torch.Tensor:
        self.info(key)
        return self._tensors[key].clone()

    def close(self) -> None:
        self._tensors = {}


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        return "ckpt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # legacy (non-zip) pickle protocol 2+
        return "ckpt"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    return "unknown"


def open_model(path: PathLike) -> ModelReader:
    """Open a model file lazily. Raises ``ModelFileError`` (with the path and the reason) on bad input."""
    p = Path(path)
    if not p.exists():
        raise FileNotFound("no such file", p)
    if p.is_dir():
        raise ModelFileError("is a directory, not a model file", p)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ModelFileError(f"cannot read: {e.strerror}", p) from None
    if size == 0:
        raise ModelFileError("empty file", p)
    try:
        kind = _sniff(p)
    except OSError as e:
        raise ModelFileError(f"cannot read: {e.strerror}", p) from None
    if kind == "safetensors":
        reader: ModelReader = SafetensorsReader(p)
    elif kind == "ckpt":
        reader = CkptReader(p)
    else:
        raise ModelFileError("not a model file (neither safetensors nor a PyTorch checkpoint)", p)
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
