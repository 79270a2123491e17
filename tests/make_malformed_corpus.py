"""Write the malformed-file regression corpus (issue 11): ``python tests/make_malformed_corpus.py [DEST]``.

DEST defaults to ``tests/corpus/malformed``; the files there are checked in, together with a README.md that has
one line per file (written by this script from :data:`CASES`). Every file is small and named for its case.

Kinds of case (``Case.kind``):

* ``unreadable``: no model reader may accept it; every command that reads it as a model answers with one
  ``SdToolkitError`` line naming the file (CLI exit 2, API 4xx).
* ``semantic``: a well-formed file whose content is wrong or odd (a 1-D first UNet conv, deeply nested metadata);
  a command may answer with a result or with one clean error, never a traceback.
* ``latent``: a well-formed safetensors file that is a bad latent; ``vae decode`` refuses it cleanly.

Cases that cannot live in git (a FIFO, a socket, links to ``/dev/zero``..., a symlink loop, a header of more
tensors than the reader accepts, which would be megabytes) are made at test time by :func:`write_runtime_cases`.

The five corrupt ``.ckpt`` files come from byte changes of a ``torch.save`` file that made stock
``torch.load(weights_only=True)`` raise IndexError, AssertionError, TypeError, struct.error and BadZipFile
(found by mutation with torch 2.13). Regenerating them with another torch version gives the same bytes only
where ``torch.save`` writes the same bytes; the checked-in files are the reference.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
DEFAULT_DEST = HERE / "corpus" / "malformed"


# ------------------------------------------------------------------------------------------------ helpers

def st_bytes(header: Any, data: bytes = b"", raw: Optional[bytes] = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (JSON of ``header``, or ``raw``), data."""
    h = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode("utf-8")
    return struct.pack("<Q", len(h)) + h + data


def st_tensor_file(tensors: Dict[str, Any], metadata: Optional[Dict[str, Any]] = None) -> bytes:
    """A well-formed safetensors file from ``{name: (dtype_name, shape, raw_bytes)}``."""
    header: Dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return st_bytes(header, data)


def f32(n: int, value: float = 0.5) -> bytes:
    return struct.pack(f"<{n}f", *([value] * n))


def latent_file(shape, metadata: Dict[str, str]) -> bytes:
    n = 1
    for s in shape:
        n *= s
    return st_tensor_file({"latent": ("F32", shape, f32(n, 0.1))}, metadata)


def _torch_zip(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_legacy(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _base_ckpt() -> Dict[str, Any]:
    import torch

    return {"state_dict": {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)},
            "epoch": 3}


def _mutate(data: bytes, changes) -> bytes:
    b = bytearray(data)
    for pos, val in changes:
        b[pos] = val
    return bytes(b)


def _replace_in_zip_pickle(zipped: bytes, marker: bytes, replacement: bytes) -> bytes:
    """Rewrite a torch zip checkpoint with the pickled string ``marker`` in data.pkl replaced by raw opcodes."""
    zin = zipfile.ZipFile(io.BytesIO(zipped))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                pickled = b"X" + struct.pack("<I", len(marker)) + marker
                assert data.count(pickled) == 1
                data = data.replace(pickled, replacement)
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zout.writestr(zi, data)
    return out.getvalue()


def _deep_list_opcodes(depth: int) -> bytes:
    """Pickle opcodes for a list nested ``depth`` deep: EMPTY_LIST x depth, then APPEND x (depth - 1)."""
    return b"]" * depth + b"a" * (depth - 1)


def _ckpt_deep_field(depth: int) -> bytes:
    import torch

    obj = {"state_dict": {"a.weight": torch.ones(2, 3)}, "epoch": 1, "deep": "__DEEP__"}
    return _replace_in_zip_pickle(_torch_zip(obj), b"__DEEP__", _deep_list_opcodes(depth))


def _unet_1d_conv() -> bytes:
    return st_tensor_file({
        "model.diffusion_model.input_blocks.0.0.weight": ("F32", [8], f32(8)),
        "model.diffusion_model.input_blocks.0.0.bias": ("F32", [8], f32(8)),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": ("I64", [1, 4],
                                                                             struct.pack("<4q", 0, 1, 2, 3)),
    })


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    name: str          # file name (the suffix tells the format the user claims)
    kind: str          # unreadable | semantic | latent
    what: str          # one line for the README
    build: Callable[[], bytes]


def _cases() -> List[Case]:
    ok_tensor = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    c: List[Case] = [
        # ---- safetensors headers
        Case("st_dtype_list.safetensors", "unreadable", "dtype given as a JSON list ([\"F32\"]); was TypeError "
             "(unhashable) in the header parser",
             lambda: st_bytes({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, f32(2))),
        Case("st_dtype_object.safetensors", "unreadable", "dtype given as a JSON object; was TypeError",
             lambda: st_bytes({"w": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}, f32(2))),
        Case("st_dtype_unknown.safetensors", "unreadable", "dtype name that does not exist (F33)",
             lambda: st_bytes({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, f32(2))),
        Case("st_header_nested_100k.safetensors", "unreadable", "header JSON nested 100k deep; was RecursionError",
             lambda: st_bytes(None, raw=('{"w":' + _deep_json(100_000) + "}").encode())),
        Case("st_metadata_nested_100k.safetensors", "unreadable",
             "__metadata__ value nested 100k deep; was RecursionError",
             lambda: st_bytes(None, f32(2), raw=('{"__metadata__":{"x":' + _deep_json(100_000) + '},"w":'
                                                 + json.dumps(ok_tensor) + "}").encode())),
        Case("st_metadata_nested_500.safetensors", "unreadable",
             "__metadata__ value nested 500 deep (over the reader's documented depth limit of 16)",
             lambda: st_bytes(None, f32(2), raw=('{"__metadata__":{"x":' + _deep_json(500) + '},"w":'
                                                 + json.dumps(ok_tensor) + "}").encode())),
        Case("st_metadata_nested_12.safetensors", "semantic",
             "__metadata__ value nested 12 deep (within the limit: kept as its JSON text)",
             lambda: st_bytes(None, f32(2), raw=('{"__metadata__":{"x":' + _deep_json(12) + '},"w":'
                                                 + json.dumps(ok_tensor) + "}").encode())),
        Case("st_sniffed_as_pickle.safetensors", "unreadable",
             "header length 0x80+256*k (first byte 0x80, a pickle's) and a header starting with a space: was "
             "sniffed as a pickle and handed to torch.load",
             lambda: st_bytes(None, f32(2), raw=(b" " + json.dumps({"w": ok_tensor}).encode()).ljust(0x180, b" "))),
        Case("st_sniffed_as_pickle.ckpt", "unreadable",
             "the same safetensors bytes under a .ckpt name",
             lambda: st_bytes(None, f32(2), raw=(b" " + json.dumps({"w": ok_tensor}).encode()).ljust(0x180, b" "))),
        Case("st_empty.safetensors", "unreadable", "zero bytes", lambda: b""),
        Case("st_truncated_length.safetensors", "unreadable", "shorter than the 8-byte header length",
             lambda: b"\x10\x00\x00"),
        Case("st_header_len_huge.safetensors", "unreadable", "header length 2**63",
             lambda: struct.pack("<Q", 2 ** 63) + b"{}"),
        Case("st_header_len_past_eof.safetensors", "unreadable", "header length past the end of the file",
             lambda: struct.pack("<Q", 4096) + b'{"w":{}}'),
        Case("st_header_not_json.safetensors", "unreadable", "header bytes are not JSON",
             lambda: st_bytes(None, raw=b"{this is not json}")),
        Case("st_header_not_utf8.safetensors", "unreadable", "header bytes are not UTF-8",
             lambda: st_bytes(None, raw=b'{"w\xff\xfe":1}')),
        Case("st_header_array.safetensors", "unreadable", "header is a JSON array",
             lambda: st_bytes(None, raw=b"[1,2,3]")),
        Case("st_header_lone_surrogate.safetensors", "unreadable",
             "tensor name with a lone UTF-16 surrogate (\\ud800), which cannot be printed",
             lambda: st_bytes(None, f32(2), raw=b'{"w\\ud800":' + json.dumps(ok_tensor).encode() + b"}")),
        Case("st_metadata_not_object.safetensors", "unreadable", "__metadata__ is a list",
             lambda: st_bytes({"__metadata__": [1, 2], "w": ok_tensor}, f32(2))),
        Case("st_entry_not_object.safetensors", "unreadable", "a tensor entry is a string",
             lambda: st_bytes({"w": "F32"})),
        Case("st_shape_negative.safetensors", "unreadable", "shape with a negative size",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, f32(2))),
        Case("st_shape_float.safetensors", "unreadable", "shape with a float size",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, f32(2))),
        Case("st_shape_bool.safetensors", "unreadable", "shape given as booleans ([true, true])",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}}, f32(1))),
        Case("st_shape_huge.safetensors", "unreadable", "shape whose product is 2**200",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [2 ** 100, 2 ** 100], "data_offsets": [0, 8]}},
                              f32(2))),
        Case("st_offsets_bad.safetensors", "unreadable", "data_offsets are strings",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, f32(2))),
        Case("st_offsets_reversed.safetensors", "unreadable", "data_offsets end before start",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, f32(2))),
        Case("st_offsets_past_eof.safetensors", "unreadable", "tensor data past the end of the file",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32(2))),
        Case("st_offsets_overlap.safetensors", "unreadable", "two tensors share their bytes",
             lambda: st_bytes({"a": ok_tensor, "b": ok_tensor}, f32(2))),
        Case("st_shape_lies.safetensors", "unreadable", "shape needs 16 bytes, offsets span 8",
             lambda: st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, f32(4))),
        Case("st_no_tensors.safetensors", "unreadable", "a valid header with metadata and no tensor",
             lambda: st_bytes({"__metadata__": {"a": "b"}})),
        Case("st_text_file.safetensors", "unreadable", "a text file with a model suffix",
             lambda: b"this is not a model at all, just some text\n" * 4),
        Case("st_unet_first_conv_1d.safetensors", "semantic",
             "SD1 keys whose first UNet conv (input_blocks.0.0.weight) is 1-D; was IndexError in arch detection",
             _unet_1d_conv),
        # ---- pickles
        Case("ckpt_index_error.ckpt", "unreadable", "corrupt zip checkpoint; stock torch.load raised IndexError",
             lambda: _mutate(_torch_zip(_base_ckpt()), [(207, 133), (143, 113), (147, 154)])),
        Case("ckpt_assertion_error.ckpt", "unreadable",
             "corrupt zip checkpoint; stock torch.load raised AssertionError",
             lambda: _mutate(_torch_zip(_base_ckpt()), [(1248, 133), (248, 133)])),
        Case("ckpt_type_error.ckpt", "unreadable", "corrupt zip checkpoint; stock torch.load raised TypeError",
             lambda: _mutate(_torch_zip(_base_ckpt()), [(582, 235), (281, 82)])),
        Case("ckpt_bad_zip.ckpt", "unreadable",
             "corrupt zip end record; zipfile.is_zipfile / torch.load raised BadZipFile",
             lambda: _mutate(_torch_zip(_base_ckpt()), [(1869, 104), (1131, 244), (906, 133)])),
        Case("ckpt_struct_error.ckpt", "unreadable",
             "legacy (non-zip) checkpoint cut at byte 220; stock torch.load raised struct.error",
             lambda: _torch_legacy(_base_ckpt())[:220]),
        Case("ckpt_truncated_zip.ckpt", "unreadable", "zip checkpoint cut in half",
             lambda: (lambda d: d[: len(d) // 2])(_torch_zip(_base_ckpt()))),
        Case("ckpt_garbage.ckpt", "unreadable", "random-looking bytes with a .ckpt name",
             lambda: bytes((i * 97 + 13) % 256 for i in range(512))),
        Case("ckpt_not_a_dict.ckpt", "unreadable", "a pickle of a list of tensors, not a dict",
             lambda: _torch_zip([1, 2, 3])),
        Case("ckpt_empty_dict.pt", "unreadable", "a pickle of an empty dict", lambda: _torch_zip({})),
        Case("ckpt_unsafe_global.ckpt", "unreadable",
             "a pickle that would call builtins.eval('1+1'); weights_only refuses it",
             lambda: b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."),
        Case("ckpt_field_nested_200k.ckpt", "semantic",
             "a non-tensor checkpoint field (a list) nested 200k deep; was RecursionError",
             lambda: _ckpt_deep_field(200_000)),
        # ---- latents (vae decode)
        Case("latent_scale_text.safetensors", "latent", "sdtoolkit.scaling_factor is 'abc'; was ValueError",
             lambda: latent_file([1, 4, 8, 8], {"sdtoolkit.latent_scaled": "true",
                                                "sdtoolkit.scaling_factor": "abc"})),
        Case("latent_scale_nan.safetensors", "latent", "sdtoolkit.scaling_factor is 'nan'",
             lambda: latent_file([1, 4, 8, 8], {"sdtoolkit.latent_scaled": "true",
                                                "sdtoolkit.scaling_factor": "nan"})),
        Case("latent_scale_zero.safetensors", "latent", "sdtoolkit.scaling_factor is '0' (division by zero)",
             lambda: latent_file([1, 4, 8, 8], {"sdtoolkit.latent_scaled": "true",
                                                "sdtoolkit.scaling_factor": "0"})),
        Case("latent_3ch.safetensors", "latent", "a latent [1, 3, 8, 8] (not 4 channels); was a conv2d RuntimeError",
             lambda: latent_file([1, 3, 8, 8], {})),
        Case("latent_16ch.safetensors", "latent",
             "a 16-channel latent [1, 16, 8, 8] (SD3/Flux) given to a 4-channel SD VAE",
             lambda: latent_file([1, 16, 8, 8], {})),
        Case("latent_3d.safetensors", "latent", "a latent [4, 8, 8] without a batch axis",
             lambda: latent_file([4, 8, 8], {})),
        Case("latent_empty.safetensors", "latent", "a latent [1, 4, 0, 8] with no pixels",
             lambda: latent_file([1, 4, 0, 8], {})),
        Case("latent_no_key.safetensors", "latent", "a safetensors file without the tensor 'latent'",
             lambda: st_tensor_file({"x": ("F32", [1, 4, 8, 8], f32(256))})),
    ]
    return c


CASES: List[Case] = _cases()

#: cases made at test time (name -> (kind, README line)); see write_runtime_cases
RUNTIME_CASES: Dict[str, str] = {
    "fifo.safetensors": "a FIFO (named pipe); opening it for reading blocks until a writer comes",
    "socket.safetensors": "a Unix socket",
    "dev_zero.safetensors": "a symlink to /dev/zero (endless zeros)",
    "dev_urandom.ckpt": "a symlink to /dev/urandom (endless random bytes)",
    "dev_null.safetensors": "a symlink to /dev/null (a character device that reads empty)",
    "symlink_loop.safetensors": "a symlink to itself (ELOOP)",
    "symlink_dangling.safetensors": "a symlink to a file that does not exist",
    "st_too_many_tensors.safetensors": "a header of MAX_TENSORS + 1 empty tensors (a few MB, so not checked in)",
}


def write_corpus(dest: Path = DEFAULT_DEST) -> Dict[str, Case]:
    """Write every checked-in case and the README into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Case] = {}
    for case in CASES:
        (dest / case.name).write_bytes(case.build())
        out[case.name] = case
    lines = ["# Malformed model files (issue 11)", "",
             "Written by `python tests/make_malformed_corpus.py`; used by tests/test_malformed_corpus.py and "
             "tests/test_fuzz_readers.py.", "Kinds: unreadable (every reader refuses it), semantic (well-formed, "
             "odd content), latent (a bad latent for `vae decode`).", ""]
    for case in CASES:
        lines.append(f"- `{case.name}` ({case.kind}): {case.what}")
    lines += ["", "Made at test time (cannot be checked in, or too large):", ""]
    for name, what in RUNTIME_CASES.items():
        lines.append(f"- `{name}`: {what}")
    (dest / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def write_runtime_cases(dest: Path, max_tensors: int) -> Dict[str, Path]:
    """Make the cases of :data:`RUNTIME_CASES` in ``dest`` (a FIFO, a socket, device links...)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    made: Dict[str, Path] = {}
    p = dest / "fifo.safetensors"
    os.mkfifo(p)
    made[p.name] = p
    p = dest / "socket.safetensors"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(p))
    finally:
        s.close()  # the socket file stays
    made[p.name] = p
    for name, target in (("dev_zero.safetensors", "/dev/zero"), ("dev_urandom.ckpt", "/dev/urandom"),
                         ("dev_null.safetensors", "/dev/null")):
        os.symlink(target, dest / name)
        made[name] = dest / name
    p = dest / "symlink_loop.safetensors"
    os.symlink(p.name, p)
    made[p.name] = p
    p = dest / "symlink_dangling.safetensors"
    os.symlink("no-such-target.safetensors", p)
    made[p.name] = p
    p = dest / "st_too_many_tensors.safetensors"
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(max_tensors + 1)}
    p.write_bytes(st_bytes(header))
    made[p.name] = p
    return made


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DEST
    written = write_corpus(target)
    print(f"{len(written)} files and README.md written to {target}")
