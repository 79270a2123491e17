"""The merge engine: streaming (file -> file) and in memory (state dict / nn.Module).

Streaming: the inputs are opened lazily (:func:`lib_sdtoolkit.files.open_model`), the output layout is planned from
their headers (A's keys in file order, then keys only the baked VAE has), and each output tensor is computed and
written at its offset by :class:`~lib_sdtoolkit.files.StreamingSafetensorsWriter` (tmp file + fsync + rename; on
any error the tmp file is removed). A ``.safetensors`` output is produced by a pipeline (:func:`_stream_merge`):
reader threads per input read the next chunks (:data:`CHUNK_ELEMENTS`) with ``os.preadv`` straight into
reused buffers (no mmap, so file pages never count toward the process's memory), compute threads convert, merge
and cast each chunk piece by cache-sized piece into a reused output buffer, and a writer thread writes it at its
offset and starts its write-back to disk; torch and the I/O calls release the GIL. Small tensors next to each
other in the output travel together (a batch: one read per input where they lie together in its file, one flat
computation per run of one block and dtype, one write), since each hand-over between threads costs about a
millisecond of wake-ups and GIL switches and a checkpoint has thousands of biases and norms. Peak memory is a fixed
number of chunk buffers, whatever the model's size (methods that need whole tensors, such as TIES and DARE, hold a few
tensors). The method's maths and facts come from its declaration in :mod:`lib_sdtoolkit.merge.methods`.

The output is hashed as it is written (sha256 and the legacy hash, in file order, by the writer's digest lane):
the report's ``output_sha256``, also put into the hash cache, so that the history record and a later merge that
takes the output as an input do not read it again (a ``.ckpt`` output is not hashed here).

The metadata names the inputs by sha256 (and the legacy hash); they come from the hash cache
(:mod:`lib_sdtoolkit.files.hash_cache`), so a merge of inputs hashed before reads each input once; the others are
hashed first, in a phase of their own (``hash_progress``), and stored in the cache.

Rules (each counted in the :class:`MergeReport`):

* maths in float32 whatever the input dtypes (:mod:`lib_sdtoolkit.ops.merge`); the result is cast once;
* integer / bool tensors are never cast to float; they are copied from A;
* marker keys (``v_pred``, ``ztsnr``, ``edm_*``; :mod:`lib_sdtoolkit.arch.markers`) are copied from A as stored,
  never averaged nor cast (hosts read v-prediction from the key; a marker only B has is not added);
* CLIP ``position_ids`` are never interpolated: kept from A as stored, or ``arange(N)`` int64 with
  ``fix_position_ids``;
* ``model_ema.*`` keys are dropped unless ``keep_ema`` (then merged with the BASE ratio where B has them);
* ``bake_vae``: ``first_stage_model.<k>`` taken from the VAE file (bare or prefixed keys; ``loss*`` and EMA
  scalars ignored);
* ``discard``: output keys matching the regex (``re.search``) are left out;
* an inpainting (9-channel) or instruct-pix2pix (8-channel) A with a 4-channel B/C merges the first 4 input
  channels of ``input_blocks.0.0.weight`` only (the WebUI's rule); the reverse order is an error;
* keys missing from B or C are taken from A; other shape mismatches and different architectures raise
  ``ArchitectureError``.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
import os
import queue
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import __version__
from ..arch import VAE_PREFIX, ArchInfo, block_of_key, detect
from ..arch.markers import is_marker_key
from ..errors import ArchitectureError, InvalidInputError, ModelFileError, SdToolkitError
from ..files import ModelReader, StreamingSafetensorsWriter, TensorInfo, check_output_path, open_model, save_ckpt
from ..files.hash_cache import HashCache
from . import methods as merge_methods
from .recipe import MergeRecipe

PathLike = Union[str, "os.PathLike[str]"]
#: ``progress(done_keys, total_keys, key)``: the merge phase
Progress = Callable[[int, int, str], None]
#: ``hash_progress(done_bytes, total_bytes, file_name)``: the hashing phase (inputs not in the hash cache)
HashProgress = Callable[[int, int, str], None]
StateLike = Union[PathLike, Mapping[str, torch.Tensor], "torch.nn.Module"]

#: elements per chunk for elementwise methods on large tensors (the unit of reading and writing)
CHUNK_ELEMENTS = 1 << 22
#: tensors at most this big are read and written in one piece
SMALL_ELEMENTS = 1 << 22
#: elements per compute piece in the streaming pipeline: convert, maths and cast of one piece stay in the CPU's
#: cache, and torch runs an op this small in the calling thread (below its 32768-element parallel grain), so the
#: pipeline's own threads, not an OpenMP team that spins on a loaded machine, share the cores
PIECE_ELEMENTS = (1 << 15) - 64
#: elements per compute piece in a worker whose torch ops run in that thread alone (:func:`_ops_in_this_thread`):
#: with no OpenMP team to wake, a bigger piece pays torch's per-op cost over more elements (an elementwise weighted
#: sum measured here: 2.5 ns per element at 32,704, 1.1 ns at 131,072; two workers at once)
PIECE_ELEMENTS_ALONE = 1 << 17
#: chunks read ahead of the compute workers (each holds one chunk of every input and of the output)
READ_AHEAD = 4
#: reader threads per input (each reads every n-th chunk, so that this many reads of one file are in flight): two
#: gave a cold Flux-width merge (2 x 1.37 GB bf16) 4 % less time than one in each of 4 alternated pairs, three no
#: more than two
READ_LANES = 2
#: tensors at most this big that follow each other in the output go through the pipeline together, as one unit of
#: work (a "batch", up to :data:`CHUNK_ELEMENTS` elements): every hand-over between the pipeline's threads costs
#: about a millisecond of wake-ups and GIL switches, which a checkpoint's many biases and norms paid one by one
#: (SD1.5: 1131 tensors, half of them under 10,000 elements)
BATCH_ITEM_ELEMENTS = 1 << 18
#: where each tensor of a batch starts in its input buffers (bytes; keeps every view aligned for its dtype)
_BATCH_ALIGN = 64
_VAE_KEY_RE = re.compile(r"^(encoder|decoder|quant_conv|post_quant_conv)\.")


# ---------------------------------------------------------------------------------------------------------------
# sources

class _Source:
    """One input: a model file read through :mod:`lib_sdtoolkit.files` or an in-memory mapping of tensors."""

    def __init__(self, name: str, obj: StateLike):
        self.name = name
        self.path: Optional[Path] = None
        self.reader: Optional[ModelReader] = None
        self.metadata: Dict[str, str] = {}
        self._map: Optional[Mapping[str, torch.Tensor]] = None
        if isinstance(obj, torch.nn.Module):
            self._map = obj.state_dict(keep_vars=False)
        elif isinstance(obj, Mapping):
            self._map = obj
        else:
            self.path = Path(obj)
            self.reader = open_model(self.path)
            self.metadata = dict(self.reader.metadata)
        if self._map is not None:
            self._infos = {k: TensorInfo(k, t.dtype, tuple(t.shape), t.numel() * t.element_size(), None)
                           for k, t in self._map.items() if isinstance(t, torch.Tensor)}
        else:
            self._infos = self.reader.infos()

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"model {self.name} (in memory)"

    def keys(self) -> List[str]:
        return list(self._infos)

    def infos(self) -> Dict[str, TensorInfo]:
        return self._infos

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    @property
    def chunkable(self) -> bool:
        return self._map is not None or (self.reader is not None and self.reader.ranged_reads)

    def read(self, key: str) -> Tuple[torch.Tensor, bool]:
        """The whole tensor and whether it is a fresh buffer the caller may modify."""
        info = self._infos[key]
        if self._map is not None:
            return self._map[key].detach(), False
        return self.reader.read_elements(key).reshape(info.shape), True

    def read_chunk(self, key: str, start: int, count: int) -> Tuple[torch.Tensor, bool]:
        if self._map is not None:
            return self._map[key].detach().reshape(-1)[start:start + count], False
        return self.reader.read_elements(key, start, count), True

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _owned32(t: torch.Tensor, fresh: bool, device: torch.device) -> torch.Tensor:
    """``t`` as a float32 tensor on ``device`` that the caller may overwrite."""
    if t.dtype == torch.float32 and t.device == device:
        return t if fresh else t.clone()
    return t.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# plan and report

@dataclass
class _Item:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    action: str  # merge | copy_a | vae | fix_pos | keep_pos
    block: str = "BASE"
    partial: bool = False  # inpainting / pix2pix A: first channels only


@dataclass
class MergeReport:
    """What a merge did (``to_dict()`` is what the API answers and the UI shows)."""

    output: Optional[str]
    architecture: str
    method: str
    keys_total: int = 0
    merged: int = 0
    copied_from_a: int = 0
    missing_from_b: List[str] = field(default_factory=list)
    missing_from_c: List[str] = field(default_factory=list)
    only_in_b: int = 0
    ema_dropped: int = 0
    discarded: int = 0
    vae_baked: int = 0
    partial_input_channels: List[str] = field(default_factory=list)
    position_ids: str = "none"
    int_tensors_kept: int = 0
    block_ratios: Dict[str, float] = field(default_factory=dict)
    block_ratios_beta: Dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0
    input_sha256: Dict[str, Optional[str]] = field(default_factory=dict)
    #: sha256 of the output file, hashed as it was written (None where the writer could not: a ``.ckpt`` output)
    output_sha256: Optional[str] = None
    #: merge into a loaded module: output keys the module has no tensor for (EMA, position_ids buffers, ...)
    not_in_module: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def summary(self) -> str:
        lines = [f"Merged {self.architecture} with {self.method}: {self.keys_total} keys "
                 f"({self.merged} merged, {self.copied_from_a} from A) in {self.seconds:.1f} s"]
        if self.output:
            lines.append(f"Output: {self.output} ({self.bytes_written / 2 ** 20:.1f} MiB)")
        if self.missing_from_b:
            lines.append(f"{len(self.missing_from_b)} keys missing from B were taken from A "
                         f"(first: {self.missing_from_b[0]})")
        if self.missing_from_c:
            lines.append(f"{len(self.missing_from_c)} keys missing from C were taken from A "
                         f"(first: {self.missing_from_c[0]})")
        if self.only_in_b:
            lines.append(f"{self.only_in_b} keys only in B/C were ignored")
        if self.ema_dropped:
            lines.append(f"{self.ema_dropped} EMA keys dropped")
        if self.discarded:
            lines.append(f"{self.discarded} keys discarded by the regex")
        if self.vae_baked:
            lines.append(f"VAE baked in ({self.vae_baked} keys)")
        if self.partial_input_channels:
            lines.append("Inpainting/pix2pix A: first 4 input channels merged in " +
                         ", ".join(self.partial_input_channels))
        lines.append(f"CLIP position_ids: {self.position_ids}")
        return "\n".join(lines)


#: architectures the engine merges: the SD checkpoints and Flux.1 (every layout, dev and schnell)
FLUX = "Flux.1"


def _mergeable(i: ArchInfo) -> bool:
    return i.is_checkpoint or i.architecture == FLUX


def _check_arch(sources: Sequence[_Source]) -> Tuple[ArchInfo, List[ArchInfo]]:
    infos = [detect(s.infos()) for s in sources]
    a = infos[0]
    for s, i in zip(sources, infos):
        if i.architecture == "SD3":
            raise ArchitectureError(f"is an SD3/SD3.5 model ({i.variant or 'unknown size'}, {i.layout} layout): "
                                    f"recognised, but merging SD3 is not supported yet", s.label)
        if not _mergeable(i):
            raise ArchitectureError(f"is a {i.architecture} file, not a Stable Diffusion or Flux.1 checkpoint",
                                    s.label)
    for s, i in zip(sources[1:], infos[1:]):
        if i.architecture != a.architecture:
            raise ArchitectureError(
                f"cannot merge a {i.architecture} checkpoint with a {a.architecture} one (model A: "
                f"{sources[0].label})", s.label)
        if a.architecture == FLUX:
            # dev and schnell merge (a key only dev has, guidance_in, is taken from A or ignored, as counted in the
            # report); two layouts do not: their key names differ, so nothing would be merged
            if i.layout != a.layout:
                raise ArchitectureError(
                    f"model {s.name} is a Flux.1 file in the {i.layout} layout but A is {a.layout}: the key names "
                    f"differ; convert one of them (or prune the transformer out of an all-in-one file) first",
                    s.label)
            continue
        if i.variant and i.variant != a.variant:
            raise ArchitectureError(
                f"model {s.name} is {i.variant} but A is {a.variant or 'a normal model'}: put the {i.variant} model "
                f"as A (its extra input channels are kept from A)", s.label)
    return a, infos


def _is_partial_ok(a: TensorInfo, o: TensorInfo) -> bool:
    return (len(a.shape) == 4 and len(o.shape) == 4 and a.shape[0] == o.shape[0] and a.shape[2:] == o.shape[2:]
            and o.shape[1] == 4 and a.shape[1] in (8, 9) and a.name.endswith("diffusion_model.input_blocks.0.0.weight"))


class _Plan:
    def __init__(self, recipe: MergeRecipe, a: _Source, others: List[_Source], vae: Optional[_Source],
                 arch: ArchInfo, out_dtype_for: Optional[Callable[[str, torch.dtype], torch.dtype]] = None):
        self.recipe = recipe
        self.method = merge_methods.get(recipe.method)
        self.a, self.others, self.vae = a, others, vae
        self.arch = arch.architecture
        self.alpha, self.beta = recipe.block_ratios(arch.architecture)
        out_dt = recipe.torch_dtype
        discard = re.compile(recipe.discard) if recipe.discard else None
        self.items: List[_Item] = []
        self.report = MergeReport(output=None, architecture=arch.architecture, method=recipe.method,
                                  block_ratios=dict(self.alpha),
                                  block_ratios_beta=dict(self.beta) if self.method.beta is not None else {})
        rep = self.report
        vae_map: Dict[str, str] = {}
        # where A keeps its VAE: first_stage_model. (SD), vae. (Flux all-in-one); a transformer-only Flux has none
        self.vae_prefix = arch.prefixes.get("vae", VAE_PREFIX) if arch.architecture == FLUX else VAE_PREFIX
        if vae is not None and arch.architecture == FLUX and "vae" not in arch.prefixes:
            raise ArchitectureError(f"model A is a Flux.1 transformer without a VAE ({arch.layout} layout): a VAE can "
                                    f"only be baked into an all-in-one checkpoint", a.label)
        if vae is not None:
            vp = self.vae_prefix
            for k in vae.keys():
                bare = k[len(vp):] if k.startswith(vp) else (k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k)
                if _VAE_KEY_RE.match(bare) and vae.infos()[k].dtype.is_floating_point:
                    vae_map[vp + bare] = k
            if not vae_map:
                raise ArchitectureError("has no VAE keys (encoder./decoder./quant_conv./post_quant_conv.)", vae.label)
        a_infos = a.infos()
        seen = set()

        def dt(name: str, src_dtype: torch.dtype) -> torch.dtype:
            if out_dtype_for is not None:
                return out_dtype_for(name, src_dtype)
            return out_dt if src_dtype.is_floating_point else src_dtype

        for k, info in a_infos.items():
            seen.add(k)
            if k.startswith("model_ema.") and not recipe.keep_ema:
                rep.ema_dropped += 1
                continue
            if discard is not None and discard.search(k):
                rep.discarded += 1
                continue
            if k in vae_map:
                vinfo = vae.infos()[vae_map[k]]
                if tuple(vinfo.shape) != tuple(info.shape):
                    raise ArchitectureError(f"VAE tensor shape {tuple(vinfo.shape)} does not fit model A's "
                                            f"{tuple(info.shape)}", vae.label, vae_map[k])
                self.items.append(_Item(k, dt(k, vinfo.dtype), info.shape, "vae"))
                rep.vae_baked += 1
                continue
            if is_marker_key(k):  # v_pred / ztsnr / edm_*: from A as stored, never averaged nor cast
                self.items.append(_Item(k, info.dtype, info.shape, "copy_a"))
                continue
            if k.endswith("embeddings.position_ids"):
                if recipe.fix_position_ids:
                    self.items.append(_Item(k, torch.int64, info.shape, "fix_pos"))
                else:
                    self.items.append(_Item(k, info.dtype, info.shape, "keep_pos"))
                continue
            if not info.dtype.is_floating_point:
                rep.int_tensors_kept += 1
                self.items.append(_Item(k, info.dtype, info.shape, "copy_a"))
                continue
            missing = False
            partial = False
            for o in others:
                if k not in o:
                    (rep.missing_from_b if o.name == "B" else rep.missing_from_c).append(k)
                    missing = True
                    break
                oinfo = o.infos()[k]
                if tuple(oinfo.shape) != tuple(info.shape):
                    if _is_partial_ok(info, oinfo):
                        partial = True
                    else:
                        raise ArchitectureError(
                            f"shape {tuple(oinfo.shape)} in model {o.name} does not match {tuple(info.shape)} in "
                            f"model A", o.label, k)
                if not oinfo.dtype.is_floating_point:
                    raise ArchitectureError(f"is {oinfo.dtype} in model {o.name} but {info.dtype} in A", o.label, k)
            if missing:
                self.items.append(_Item(k, dt(k, info.dtype), info.shape, "copy_a"))
                continue
            block = block_of_key(k, self.arch)
            self.items.append(_Item(k, dt(k, info.dtype), info.shape, "merge", block, partial))
            if partial:
                rep.partial_input_channels.append(k)
        for vk, src_k in vae_map.items():
            if vk in seen:
                continue
            if discard is not None and discard.search(vk):
                rep.discarded += 1
                continue
            vinfo = vae.infos()[src_k]
            self.items.append(_Item(vk, dt(vk, vinfo.dtype), vinfo.shape, "vae"))
            rep.vae_baked += 1
        rep.only_in_b = len({k for o in others for k in o.keys()} - set(a_infos))
        rep.keys_total = len(self.items)
        rep.merged = sum(1 for i in self.items if i.action == "merge")
        rep.copied_from_a = sum(1 for i in self.items if i.action in ("copy_a", "keep_pos"))
        pos = [i for i in self.items if i.action in ("fix_pos", "keep_pos")]
        if not pos:
            rep.position_ids = "none"
        elif recipe.fix_position_ids:
            rep.position_ids = "reset to arange int64"
        else:
            rep.position_ids = "kept from A"

    # -----------------------------------------------------------------------------------------------------------
    def compute(self, item: _Item, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output tensor of ``item`` (CPU, dtype ``item.dtype``; written into ``out`` when given)."""
        if item.action == "fix_pos":
            n = 1
            for s in item.shape:
                n *= s
            res = torch.arange(n, dtype=torch.int64).reshape(item.shape)
        elif item.action in ("keep_pos", "copy_a", "vae"):
            src, key = (self.vae, self._vae_key(item.name)) if item.action == "vae" else (self.a, item.name)
            t, fresh = src.read(key)
            if t.dtype != item.dtype:
                res = t.to(item.dtype)
            else:
                res = t if fresh else t.clone()
        else:
            return self._merge(item, device, out)
        if out is not None:
            out.copy_(res.reshape(out.shape))
            return out
        return res.contiguous()

    def _vae_key(self, name: str) -> str:
        bare = name[len(self.vae_prefix):]
        if bare in self.vae:
            return bare
        return name if name in self.vae else VAE_PREFIX + bare

    def _merge(self, item: _Item, device: torch.device, out: Optional[torch.Tensor]) -> torch.Tensor:
        alpha = self.alpha[item.block]
        beta = self.beta[item.block]
        numel = 1
        for s in item.shape:
            numel *= s
        srcs = [self.a] + self.others
        chunked = (self.method.elementwise and not item.partial and numel > SMALL_ELEMENTS
                   and all(s.chunkable for s in srcs))
        if out is None:
            out = torch.empty(item.shape, dtype=item.dtype)
        flat = out.reshape(-1)
        if chunked:
            for start in range(0, numel, CHUNK_ELEMENTS):
                n = min(CHUNK_ELEMENTS, numel - start)
                ts = [_owned32(*s.read_chunk(item.name, start, n), device) for s in srcs]
                res = self._elementwise(ts, alpha, beta)
                flat[start:start + n].copy_(res)
                del ts, res
            return out
        full = [s.read(item.name) for s in srcs]
        a_t = full[0][0]
        if item.partial:
            nch = 4
            ts = [_owned32(a_t[:, :nch], False, device)] + [_owned32(t, f, device) for t, f in full[1:]]
            part = self._whole(ts, alpha, beta, item.name)
            res = a_t.to(device=device, dtype=torch.float32).clone()
            res[:, :nch] = part
        else:
            ts = [_owned32(t, f, device) for t, f in full]
            res = self._whole(ts, alpha, beta, item.name)
        out.copy_(res.reshape(item.shape))
        return out

    def _elementwise(self, ts: List[torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
        """An elementwise method on float32 tensors the engine owns (overwritten in place)."""
        return self.method.call(ts, alpha, beta, inplace=True)

    def _whole(self, ts: List[torch.Tensor], alpha: float, beta: float, key: str) -> torch.Tensor:
        return self.method.call(ts, alpha, beta, seed=self.recipe.seed, key=key, inplace=self.method.elementwise)


# ---------------------------------------------------------------------------------------------------------------
# metadata

#: what the metadata records of each input (the WebUI's ``sd_merge_models``): the sha256 and the legacy 8-hex hash
HASH_ALGOS = ("sha256", "autov1")


def input_hashes(sources: Mapping[str, "_Source"], cache: Optional[HashCache] = None,
                 progress: Optional[HashProgress] = None) -> Dict[str, Tuple[str, str]]:
    """``{name: (sha256, legacy hash)}`` of the inputs that are files, from ``cache`` where it holds them for the
    file as it is now; the others are computed (one read of each file, two files at a time) and stored in it.

    ``progress(done_bytes, total_bytes, file_name)`` reports the hashing phase: called only when something has to be
    hashed, first with ``(0, total, "")``, then after each chunk read; ``total`` counts the files being hashed only.
    A file that changes while it is hashed raises ``ModelFileError``."""
    from ..files.hash_cache import cached_hash_file

    paths = {n: s.path for n, s in sources.items() if s.path is not None}
    if not paths:
        return {}
    found: Dict[str, Tuple[str, str]] = {}
    todo: Dict[str, Path] = {}  # real path -> path, each file once however many inputs it is
    sizes: Dict[str, int] = {}
    for n, p in paths.items():
        hit = cache.get_hashes(p, HASH_ALGOS) if cache is not None else None
        if hit is not None:
            found[os.path.realpath(p)] = (hit.sha256, hit.autov1)
        else:
            todo.setdefault(os.path.realpath(p), p)
            sizes[os.path.realpath(p)] = sources[n].reader.file_size
    if todo:
        total = sum(sizes.values())
        done = dict.fromkeys(todo, 0)
        lock = threading.Lock()
        if progress:
            progress(0, total, "")

        def one(k: str) -> Tuple[str, str]:
            p = todo[k]

            def tick(d: int, _size: int) -> None:
                if progress:
                    with lock:
                        done[k] = d
                        progress(sum(done.values()), total, p.name)

            res = cached_hash_file(p, HASH_ALGOS, cache, progress=tick)
            if res.changed:
                raise ModelFileError("the file changed while it was hashed; try again", p)
            return res.sha256, res.autov1

        with cf.ThreadPoolExecutor(max_workers=min(2, len(todo)), thread_name_prefix="sdtoolkit-hash") as ex:
            futs = {k: ex.submit(one, k) for k in todo}
            found.update({k: f.result() for k, f in futs.items()})
    return {n: found[os.path.realpath(p)] for n, p in paths.items()}


def _hashes_for(recipe: MergeRecipe, sources: Mapping[str, "_Source"], hash_cache: Union[HashCache, bool, None],
                progress: Optional[HashProgress]) -> Dict[str, Tuple[str, str]]:
    """The input hashes the metadata needs (none without ``save_metadata``); ``hash_cache``: a ``HashCache``, True
    for the default one (opened and closed here), False/None for none."""
    if not recipe.save_metadata:
        return {}
    with _opened_cache(hash_cache) as cache:
        return input_hashes(sources, cache, progress)


@contextlib.contextmanager
def _opened_cache(hash_cache: Union[HashCache, bool, None]) -> Iterator[Optional[HashCache]]:
    """``hash_cache`` as :func:`merge_files` takes it -> the ``HashCache`` to use or None (True: the default cache,
    opened here and closed on exit; False/None: no cache)."""
    if isinstance(hash_cache, HashCache):
        yield hash_cache
    elif hash_cache:
        with HashCache() as cache:
            yield cache
    else:
        yield None


def _store_output_hashes(hash_cache: Union[HashCache, bool, None], out: Path, digests: Mapping[str, str]) -> None:
    """Put the output's hashes (computed while it was written) into the hash cache, so that the history record
    and a later merge that takes the output as an input find them instead of reading the file. ``hash_cache`` as
    in :func:`merge_files` (True: the default cache, False/None: none)."""
    from ..files.hashes import FileHashes

    try:
        st = os.stat(out)
    except OSError:
        return
    res = FileHashes(path=str(out), size=st.st_size, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns,
                     sha256=digests["sha256"], autov1=digests["autov1"], algos=("sha256", "autov1"))
    with _opened_cache(hash_cache) as cache:
        if cache is not None:
            cache.put_hashes(res, st)


def _decode(meta: Mapping[str, str], key: str) -> Any:
    v = meta.get(key)
    if isinstance(v, str) and v.startswith("{"):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def build_metadata(recipe: MergeRecipe, sources: Dict[str, _Source], hashes: Dict[str, Tuple[str, str]],
                   arch: ArchInfo, output: Optional[Path], names: Optional[Dict[str, str]] = None,
                   report: Optional[MergeReport] = None, custom_name: Optional[str] = None) -> Dict[str, str]:
    """The metadata the WebUI's merger writes (A1111 1.10 modules/extras.py ``run_modelmerger`` with its defaults
    "Save metadata" and "Copy metadata from merged models"), with our recipe fields added:

    1. the metadata of A, then B, then C, copied as they are (a later input wins a key both have);
    2. ``format`` = ``pt``;
    3. ``sd_merge_recipe``: the recipe (the WebUI's fields, then ours), JSON;
    4. ``sd_merge_models``: for each input in A, B, C order, ``{sha256: {name, legacy_hash, sd_merge_recipe (the
       input's own recipe, or None)}}`` followed by the input's own ``sd_merge_models`` (its parents), JSON.

    Only string values are copied (a safetensors header holds nothing else). ``custom_name`` (the WebUI's field)
    defaults to the output's file name without its suffix."""
    names = names or {}
    copied: Dict[str, str] = {}
    for n in ("A", "B", "C"):
        src = sources.get(n)
        if src is not None:
            copied.update({k: v for k, v in (src.metadata or {}).items() if isinstance(k, str) and isinstance(v, str)})
    sha = {n: (hashes.get(n) or (None, None))[0] for n in ("A", "B", "C", "VAE")}
    spec = merge_methods.get(recipe.method)
    rec: Dict[str, Any] = {
        "type": "sd-toolkit",
        "primary_model_hash": sha["A"],
        "secondary_model_hash": sha["B"],
        "tertiary_model_hash": sha["C"],
        "interp_method": spec.webui_name or recipe.method,
        "multiplier": recipe.alpha,
        "save_as_half": recipe.dtype == "fp16",
        "custom_name": custom_name or (output.stem if output is not None else None),
        "config_source": 0,
        "bake_in_vae": names.get("VAE") or (Path(recipe.bake_vae).name if recipe.bake_vae else "None"),
        "discard_weights": recipe.discard or "",
        "is_inpainting": arch.variant == "inpainting",
        "is_instruct_pix2pix": arch.variant == "instruct-pix2pix",
        "method": recipe.method,
        "alpha": recipe.alpha,
        "beta": recipe.effective_beta,
        "block_weighted": recipe.block_weighted,
        "preset": recipe.preset,
        "blocks": report.block_ratios if report is not None and recipe.block_weighted else None,
        "blocks_beta": ((report.block_ratios_beta or None) if report is not None and recipe.blocks_beta is not None
                        else None),
        "dtype": recipe.dtype,
        "keep_ema": recipe.keep_ema,
        "fix_position_ids": recipe.fix_position_ids,
        "seed": recipe.seed if spec.seeded else None,
        "vae_hash": sha["VAE"],
        "sdtoolkit_version": __version__,
    }
    models: Dict[str, Any] = {}
    for n in ("A", "B", "C"):
        src = sources.get(n)
        if src is None or hashes.get(n) is None:
            continue
        s, legacy = hashes[n]
        models[s] = {"name": names.get(n) or (src.path.name if src.path else n), "legacy_hash": legacy,
                     "sd_merge_recipe": _decode(src.metadata, "sd_merge_recipe")}
        parents = _decode(src.metadata, "sd_merge_models")
        if isinstance(parents, dict):
            models.update(parents)
    copied.update({"format": "pt", "sd_merge_recipe": json.dumps(rec), "sd_merge_models": json.dumps(models)})
    return copied


# ---------------------------------------------------------------------------------------------------------------
# the streaming pipeline (file -> file, CPU)

@dataclass
class _Seg:
    """One unit of work: elements ``[start, start + count)`` of an output tensor (``kind`` "chunk": read the range
    of every input, convert, maths, cast; "copy": read the range of A / the VAE and cast; "whole": the tensor by
    :meth:`_Plan.compute`)."""

    index: int
    item: _Item
    kind: str
    start: int = 0
    count: int = 0
    srcs: Tuple[Tuple[Any, str, torch.dtype], ...] = ()  # (reader, key, stored dtype) per input
    #: kind "batch": whole small tensors (each a "chunk" or "copy" segment of one part) next to each other in the
    #: output, computed from one slot and written with one write; ``at`` holds each member's byte offset in the
    #: input buffers (one per input of the member), ``out_at`` its byte offset in the output buffer (contiguous,
    #: as in the file)
    members: Tuple["_Seg", ...] = ()
    at: Tuple[Tuple[int, ...], ...] = ()
    out_at: Tuple[int, ...] = ()
    #: per input of a batch: its members lie next to each other in that file, so it is read with one read
    #: (``at`` is then each member's place in the file relative to the first), else tensor by tensor
    spans: Tuple[bool, ...] = ()
    #: a batch's members in runs ``(first, end, elements)`` computed as one flat range: members of one kind, block
    #: and dtypes whose elements sit at the same places in every input buffer and in the output buffer (elementwise
    #: maths do not care where one tensor ends and the next begins, so the bytes are those of member by member)
    runs: Tuple[Tuple[int, int, int], ...] = ()

    def nbytes(self) -> int:
        """Bytes this segment needs in each slot buffer (0: computed whole, no slot)."""
        if self.kind == "whole":
            return 0
        if self.kind == "batch":
            last, at = self.members[-1], self.at[-1]
            ins = [a + last.count * _esize(d) for a, (_, _, d) in zip(at, last.srcs)]
            return max(ins + [self.out_at[-1] + last.count * _esize(last.item.dtype)])
        return self.count * max([_esize(d) for _, _, d in self.srcs] + [_esize(self.item.dtype)])


class _Slot:
    """Reused byte buffers: one per input and one for the output, each ``cap`` bytes (allocated once)."""

    def __init__(self, nin: int, cap: int):
        self.inp = [torch.empty(cap, dtype=torch.uint8) for _ in range(nin)]
        self.out = torch.empty(cap, dtype=torch.uint8)


_OMP_SET: Any = None


def _ops_in_this_thread() -> bool:
    """Make torch run its ops in the calling thread alone (no OpenMP team), for this thread only; True if done.

    OpenMP's thread count is a per-thread setting (the ``nthreads-var`` ICV) and torch reads it per call
    (``at::get_num_threads`` is ``omp_get_max_threads``); torch sets a new thread's copy on its first parallel op
    from its global setting. So after that first use, ``omp_set_num_threads(1)`` from the OpenMP runtime torch loaded
    changes this worker only: ``torch.get_num_threads()`` in any other thread, the WebUI's included, is unchanged,
    and torch's global setting is not touched. Checked, not assumed: False (nothing changed, pieces stay below the
    parallel grain) where the runtime is not libgomp found in this process's maps (Linux) or the call does not take."""
    global _OMP_SET
    if _OMP_SET is None:
        _OMP_SET = False
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                libs = sorted({ln.split()[-1] for ln in fh if "/libgomp" in ln and ".so" in ln})
            if libs:
                import ctypes

                fn = ctypes.CDLL(libs[0]).omp_set_num_threads
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                _OMP_SET = fn
        except (OSError, AttributeError):
            _OMP_SET = False
    if not _OMP_SET:
        return False
    torch.get_num_threads()  # torch's first use in this thread sets its copy; ours must come after
    _OMP_SET(1)
    return torch.get_num_threads() == 1


def _view(buf: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    return buf[: n * _esize(dtype)].view(dtype)


def _esize(dtype: torch.dtype) -> int:
    from ..files.reader import dtype_size

    return dtype_size(dtype)


class _Stop(Exception):
    pass


def _segments(plan: _Plan, ranged: bool) -> List[_Seg]:
    """The pipeline's work list, in output order."""
    segs: List[_Seg] = []
    srcs = [plan.a] + plan.others
    chunkable_method = plan.method.elementwise
    for idx, it in enumerate(plan.items):
        numel = 1
        for d in it.shape:
            numel *= d
        parts: Optional[Tuple[Tuple[Any, str, torch.dtype], ...]] = None
        kind = "whole"
        if ranged and numel:
            if it.action == "merge" and chunkable_method and not it.partial:
                if all(s.reader is not None and s.reader.ranged_reads for s in srcs):
                    parts = tuple((s.reader, it.name, s.infos()[it.name].dtype) for s in srcs)
                    kind = "chunk"
            elif it.action in ("copy_a", "keep_pos", "vae"):
                src, key = (plan.vae, plan._vae_key(it.name)) if it.action == "vae" else (plan.a, it.name)
                if src.reader is not None and src.reader.ranged_reads:
                    parts = ((src.reader, key, src.infos()[key].dtype),)
                    kind = "copy"
        if parts is None:
            segs.append(_Seg(idx, it, "whole"))
            continue
        step = numel if numel <= SMALL_ELEMENTS else CHUNK_ELEMENTS
        for start in range(0, numel, step):
            segs.append(_Seg(idx, it, kind, start, min(step, numel - start), parts))
    return _batched(segs)


def _span_layout(srcs: Sequence[Tuple[Any, str, torch.dtype]]) -> Optional[List[int]]:
    """Where each of these tensors starts relative to the first, if they are next to each other in one safetensors
    file in this order and each start is aligned for its dtype (one read then brings them all); else None."""
    r = srcs[0][0]
    if not hasattr(r, "read_span_into") or any(x[0] is not r for x in srcs):
        return None
    infos = [r.info(k) for _, k, _ in srcs]
    if infos[0].offset is None:
        return None
    base = pos = infos[0].offset
    rel: List[int] = []
    for info, (_, _, dt) in zip(infos, srcs):
        if info.offset != pos or (pos - base) % _esize(dt):
            return None
        rel.append(pos - base)
        pos += info.nbytes
    return rel


def _runs(members: Sequence[_Seg], at: Sequence[Tuple[int, ...]], out_at: Sequence[int]
          ) -> Tuple[Tuple[int, int, int], ...]:
    """See :attr:`_Seg.runs`."""
    runs: List[Tuple[int, int, int]] = []
    first = 0
    elems = 0

    def key(m: _Seg) -> tuple:
        return (m.kind, m.item.block, m.item.dtype, tuple(d for _, _, d in m.srcs))

    for j, m in enumerate(members):
        if j > first:
            head = members[first]
            same = key(m) == key(head)
            if same:  # element j of the run at the same element offset in every buffer
                same = (out_at[j] - out_at[first] == elems * _esize(m.item.dtype)
                        and all(a - a0 == elems * _esize(d) for a, a0, (_, _, d) in zip(at[j], at[first], m.srcs)))
            if not same:
                runs.append((first, j, elems))
                first, elems = j, 0
        elems += m.count
    runs.append((first, len(members), elems))
    return tuple(runs)


def _batched(segs: List[_Seg]) -> List[_Seg]:
    """``segs`` with each run of small whole tensors (:data:`BATCH_ITEM_ELEMENTS`) that follow each other in the
    output joined into one "batch" segment of at most :data:`CHUNK_ELEMENTS` elements. A batch's output bytes are
    one contiguous range of the file; a member whose output offset in it would not be aligned for its dtype starts
    a new batch. A run of one stays as it was."""
    out: List[_Seg] = []
    run: List[_Seg] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            nin = len(run[0].srcs)
            cols: List[List[int]] = []
            spans: List[bool] = []
            for i in range(nin):
                col = _span_layout([m.srcs[i] for m in run])
                spans.append(col is not None)
                if col is None:  # one read per tensor, each at an aligned place of the buffer
                    col, pos = [], 0
                    for m in run:
                        col.append(pos)
                        pos += -(-m.count * _esize(m.srcs[i][2]) // _BATCH_ALIGN) * _BATCH_ALIGN
                cols.append(col)
            out_at: List[int] = []
            opos = 0
            for m in run:
                out_at.append(opos)
                opos += m.count * _esize(m.item.dtype)
            at = tuple(tuple(c[j] for c in cols) for j in range(len(run)))
            out.append(_Seg(run[0].index, run[0].item, "batch", members=tuple(run), at=at, out_at=tuple(out_at),
                            spans=tuple(spans), runs=_runs(run, at, out_at)))
        run.clear()

    elements = out_bytes = 0
    for sg in segs:
        small = sg.kind in ("chunk", "copy") and sg.start == 0 and 0 < sg.count <= BATCH_ITEM_ELEMENTS
        if small and run:
            same_inputs = len(sg.srcs) == len(run[0].srcs)
            aligned = out_bytes % _esize(sg.item.dtype) == 0
            if not same_inputs or not aligned or elements + sg.count > CHUNK_ELEMENTS:
                flush()
        if not small:
            flush()
            out.append(sg)
            continue
        if not run:
            elements = out_bytes = 0
        run.append(sg)
        elements += sg.count
        out_bytes += sg.count * _esize(sg.item.dtype)
    flush()
    return out


def _stream_merge(plan: _Plan, writer: StreamingSafetensorsWriter, device: torch.device, workers: int,
                  progress: Optional[Progress], cancel: Optional[threading.Event]) -> Dict[str, float]:
    """Compute every planned tensor into ``writer`` with reading, computing and writing overlapped.

    A reader thread hands out reused buffers (:data:`READ_AHEAD` chunks ahead) to :data:`READ_LANES` lane threads
    per input, which read the next chunks or batches (``os.preadv`` straight into the buffers); ``workers``
    compute threads turn a chunk into output bytes piece by piece (:data:`PIECE_ELEMENTS_ALONE` where the worker
    runs torch's ops alone, :func:`_ops_in_this_thread`, else :data:`PIECE_ELEMENTS`): stored dtype -> float32
    into a reused buffer, the method in place, cast into the chunk's output buffer (one pass over the data, no
    allocation per tensor); one writer thread writes finished chunks at their offsets (``os.pwrite``) and starts
    their write-back to disk. torch and the I/O calls release
    the GIL. The maths per element are the method's own, in the same order, so the output is bit-identical to
    computing each tensor whole. Tensors that cannot be chunked (methods that are not elementwise, a partial
    inpainting input, inputs without ranged reads) are computed whole by a worker with :meth:`_Plan.compute`.

    Returns the seconds each stage spent working and waiting (summed over the compute workers), for the bench."""
    segs = _segments(plan, device.type == "cpu")
    items = plan.items
    total = len(items)
    remaining = [0] * total
    for sg in segs:
        for m in sg.members or (sg,):
            remaining[m.index] += 1
    nin = 1 + len(plan.others)
    cap = max([1] + [sg.nbytes() for sg in segs])
    workers = max(1, workers)
    free: "queue.Queue[_Slot]" = queue.Queue()
    nslots = workers + READ_AHEAD if any(sg.kind != "whole" for sg in segs) else 0
    for _ in range(nslots):
        free.put(_Slot(nin, cap))
    ready: "queue.Queue" = queue.Queue()
    to_write: "queue.Queue" = queue.Queue()
    finished: "queue.Queue" = queue.Queue()
    stop = threading.Event()
    stats = dict.fromkeys(("read_wait", "compute", "compute_wait", "write", "write_wait"), 0.0)
    stats["segments"] = len(segs)
    stats["workers"] = workers
    whole_tokens = threading.Semaphore(workers + 1)
    errors: List[BaseException] = []
    err_lock = threading.Lock()

    def fail(e: BaseException) -> None:
        with err_lock:
            if not isinstance(e, _Stop):
                errors.append(e)
        stop.set()
        finished.put(None)

    def get(q: "queue.Queue") -> Any:
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    raise _Stop() from None

    # READ_LANES readers per input, so that the inputs' reads are in flight at the same time (two files read side
    # by side take about half the time of one after the other on the disks measured); a slot is ready when every
    # input's part is in it
    parts_left: Dict[int, int] = {}
    parts_lock = threading.Lock()
    per_input = max(1, READ_LANES)
    lanes: List[List["queue.Queue"]] = [[queue.Queue() for _ in range(per_input)] for _ in range(nin)]

    def lane(i: int, q: "queue.Queue") -> None:
        try:
            while True:
                job = get(q)
                if job is None:
                    return
                sg, slot = job
                t0 = time.perf_counter()
                if sg.kind == "batch" and sg.spans[i]:
                    last = sg.members[-1]
                    size = sg.at[-1][i] + last.count * _esize(last.srcs[i][2])
                    last.srcs[i][0].read_span_into([m.srcs[i][1] for m in sg.members], slot.inp[i][:size])
                elif sg.kind == "batch":
                    for m, at in zip(sg.members, sg.at):
                        r, key, dt = m.srcs[i]
                        r.read_into(key, _view(slot.inp[i][at[i]:], dt, m.count), 0)
                else:
                    r, key, dt = sg.srcs[i]
                    r.read_into(key, _view(slot.inp[i], dt, sg.count), sg.start)
                with parts_lock:
                    stats[f"read_{i}"] = stats.get(f"read_{i}", 0.0) + time.perf_counter() - t0
                    parts_left[id(slot)] -= 1
                    last = not parts_left[id(slot)]
                if last:
                    ready.put((sg, slot))
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            fail(e)

    lane_threads = [threading.Thread(target=lane, args=(i, q), name=f"sdtoolkit-merge-read-{i}", daemon=True)
                    for i in range(nin) for q in lanes[i]]

    def reader() -> None:
        try:
            n_read = 0
            for sg in segs:
                if stop.is_set():
                    return
                if sg.kind == "whole":
                    while not whole_tokens.acquire(timeout=0.05):  # bounds the whole tensors in flight
                        if stop.is_set():
                            return
                    ready.put((sg, None))
                    continue
                t0 = time.perf_counter()
                slot = get(free)
                stats["read_wait"] += time.perf_counter() - t0
                nsrc = len(sg.members[0].srcs if sg.kind == "batch" else sg.srcs)
                with parts_lock:
                    parts_left[id(slot)] = nsrc
                for i in range(nsrc):
                    lanes[i][n_read % per_input].put((sg, slot))
                n_read += 1
            for qs in lanes:
                for q in qs:
                    q.put(None)
            for t in lane_threads:  # every slot read before the compute workers are told to stop
                t.join()
            for _ in range(workers):
                ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            fail(e)

    method = plan.method

    def one(sg: _Seg, inp: List[torch.Tensor], obuf: torch.Tensor, scratch: List[torch.Tensor],
            fill: bool = False) -> torch.Tensor:
        """The output of a "chunk" or "copy" segment from its input bytes ``inp`` into ``obuf`` (the bytes to
        write: a view of ``obuf``, or of the input itself when a copy needs no cast, unless ``fill``)."""
        it = sg.item
        n = sg.count
        out = _view(obuf, it.dtype, n)
        if sg.kind == "copy":
            src = _view(inp[0], sg.srcs[0][2], n)
            if src.dtype == it.dtype and not fill:
                return src
            out.copy_(src)
            return out
        alpha, beta = plan.alpha[it.block], plan.beta[it.block]
        step = scratch[0].numel()
        pieces = [_view(inp[i], dt, n).split(step) for i, (_, _, dt) in enumerate(sg.srcs)]
        for j, o in enumerate(out.split(step)):
            m = o.numel()
            ts = []
            for x, f in zip(pieces, scratch):
                f = f if m == step else f[:m]
                f.copy_(x[j])
                ts.append(f)
            o.copy_(method.call(ts, alpha, beta, inplace=True))
        return out

    def compute() -> None:
        try:
            piece = PIECE_ELEMENTS_ALONE if _ops_in_this_thread() else PIECE_ELEMENTS
            scratch = [torch.empty(min(piece, CHUNK_ELEMENTS, cap), dtype=torch.float32) for _ in range(nin)]
            busy = wait = 0.0
            while True:
                t0 = time.perf_counter()
                job = get(ready)
                t1 = time.perf_counter()
                wait += t1 - t0
                if job is None:
                    with err_lock:
                        stats["compute"] += busy
                        stats["compute_wait"] += wait
                    return
                sg, slot = job
                it = sg.item
                if sg.kind == "whole":
                    to_write.put((sg, None, plan.compute(it, device)))
                    busy += time.perf_counter() - t1
                    continue
                if sg.kind == "batch":
                    for first, end, count in sg.runs:
                        m, at = sg.members[first], sg.at[first]
                        if end - first > 1:
                            m = _Seg(m.index, m.item, m.kind, 0, count, m.srcs)
                        one(m, [slot.inp[i][a:] for i, a in enumerate(at)], slot.out[sg.out_at[first]:], scratch,
                            fill=True)
                    last = sg.members[-1]
                    out = slot.out[: sg.out_at[-1] + last.count * _esize(last.item.dtype)]
                else:
                    out = one(sg, slot.inp, slot.out, scratch)
                busy += time.perf_counter() - t1
                to_write.put((sg, slot, out))
        except BaseException as e:  # noqa: BLE001
            fail(e)

    def write() -> None:
        try:
            left = len(segs)
            while left:
                t0 = time.perf_counter()
                sg, slot, data = get(to_write)
                t1 = time.perf_counter()
                stats["write_wait"] += t1 - t0
                # the buffers go back (a whole tensor's token, a chunk's slot) once the writer is done with them:
                # at once, or once its digest lane has hashed them (in file order, see StreamingSafetensorsWriter)
                if sg.kind == "whole":
                    writer.write(sg.item.name, data, release=whole_tokens.release)
                    del data
                elif sg.kind == "batch":
                    writer.write_span([m.item.name for m in sg.members], data,
                                      release=functools.partial(free.put, slot))
                else:
                    writer.write_part(sg.item.name, sg.start, data, release=functools.partial(free.put, slot))
                stats["write"] += time.perf_counter() - t1
                left -= 1
                for m in sg.members or (sg,):
                    remaining[m.index] -= 1
                    if not remaining[m.index]:
                        finished.put(m.index)
        except BaseException as e:  # noqa: BLE001
            fail(e)

    threads = lane_threads + [threading.Thread(target=reader, name="sdtoolkit-merge-read", daemon=True),
               threading.Thread(target=write, name="sdtoolkit-merge-write", daemon=True)]
    threads += [threading.Thread(target=compute, name=f"sdtoolkit-merge-{i}", daemon=True) for i in range(workers)]
    done = 0
    if progress:
        progress(0, total, "")
    for t in threads:
        t.start()
    try:
        while done < total:
            if cancel is not None and cancel.is_set():
                raise SdToolkitError("merge cancelled")
            try:
                idx = finished.get(timeout=0.1)
            except queue.Empty:
                continue
            if idx is None:
                break
            done += 1
            if progress:
                progress(done, total, items[idx].name)
    finally:
        if errors or done < total:
            stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return stats


# ---------------------------------------------------------------------------------------------------------------
# running

def _run_items(plan: _Plan, items: Sequence[_Item], work: Callable[[_Item], None], workers: int,
               progress: Optional[Progress], cancel: Optional[threading.Event] = None) -> None:
    total = len(items)
    done = 0
    if progress:
        progress(0, total, "")
    if workers <= 1:
        for it in items:
            if cancel is not None and cancel.is_set():
                raise SdToolkitError("merge cancelled")
            work(it)
            done += 1
            if progress:
                progress(done, total, it.name)
        return
    ex = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtoolkit-merge")
    pending: deque = deque()
    try:
        for it in items:
            if cancel is not None and cancel.is_set():
                raise SdToolkitError("merge cancelled")
            pending.append((it, ex.submit(work, it)))
            while len(pending) > workers * 2:
                pit, fut = pending.popleft()
                fut.result()
                done += 1
                if progress:
                    progress(done, total, pit.name)
        while pending:
            pit, fut = pending.popleft()
            fut.result()
            done += 1
            if progress:
                progress(done, total, pit.name)
    except BaseException:
        for _, fut in pending:
            fut.cancel()
        ex.shutdown(wait=True)
        raise
    ex.shutdown(wait=True)


def _open_sources(recipe: MergeRecipe, a: Optional[StateLike], b: Optional[StateLike], c: Optional[StateLike],
                  vae: Optional[StateLike]) -> Dict[str, _Source]:
    objs = {"A": a if a is not None else recipe.model_a,
            "B": b if b is not None else recipe.model_b,
            "C": c if c is not None else recipe.model_c,
            "VAE": vae if vae is not None else recipe.bake_vae}
    out: Dict[str, _Source] = {}
    try:
        for n, o in objs.items():
            if o is None or (isinstance(o, str) and not o):
                continue
            out[n] = _Source(n, o)
    except BaseException:
        for s in out.values():
            s.close()
        raise
    return out


def _device(recipe: MergeRecipe) -> torch.device:
    dev = torch.device(recipe.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda asked but CUDA is not available here")
    return dev


def merge_files(recipe: MergeRecipe, output: PathLike, overwrite: bool = False, progress: Optional[Progress] = None,
                workers: Optional[int] = None, names: Optional[Dict[str, str]] = None,
                cancel: Optional[threading.Event] = None, hash_cache: Union[HashCache, bool, None] = True,
                hash_progress: Optional[HashProgress] = None, custom_name: Optional[str] = None) -> MergeReport:
    """Run ``recipe`` on its model files and write ``output`` (``.safetensors`` streamed; ``.ckpt`` built in memory).

    ``names`` optionally gives display names for A/B/C/VAE in the metadata (the WebUI's checkpoint names);
    ``custom_name`` the name the metadata records (default: the output's stem; a history re-run keeps the
    original's, so that its file is byte-identical).

    Two phases, each with its own progress callable (a face shows them as two bars, or one after the other):

    1. hashing (only with ``save_metadata``, only inputs the hash cache lacks): ``hash_progress(done_bytes,
       total_bytes, file_name)``, see :func:`input_hashes`. ``hash_cache``: the ``HashCache`` to read and fill,
       True (default) for the default one, False for none (every input is hashed);
    2. merging: ``progress(done_keys, total_keys, key)``.

    With every input in the hash cache (or ``save_metadata`` off) each input file is read once."""
    t0 = time.perf_counter()
    recipe.validate()
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise InvalidInputError(f"output must end in .safetensors or .ckpt, got {out.name!r}")
    inputs = [m for m in (recipe.model_a, recipe.model_b, recipe.model_c, recipe.bake_vae) if m]
    check_output_path(out, inputs, overwrite)
    dev = _device(recipe)
    sources = _open_sources(recipe, None, None, None, None)
    try:
        ab = [sources[n] for n in ("A", "B", "C") if n in sources]
        arch, _ = _check_arch(ab)
        plan = _Plan(recipe, ab[0], ab[1:], sources.get("VAE"), arch)
        hashes = _hashes_for(recipe, sources, hash_cache, hash_progress)
        plan.report.input_sha256 = {n: h[0] for n, h in hashes.items()}
        meta = (build_metadata(recipe, sources, hashes, arch, out, names, plan.report, custom_name)
                if recipe.save_metadata else {})
        nworkers = workers if workers is not None else min(2, os.cpu_count() or 1)
        if suffix == ".safetensors":
            specs = [(i.name, i.dtype, i.shape) for i in plan.items]
            t_open = time.perf_counter()
            # the writer hashes the output as it writes it (sha256 + AutoV1, in file order), so the history record
            # and a later merge that takes the output as an input do not read it again
            with StreamingSafetensorsWriter(out, specs, meta or None, overwrite=overwrite, early_writeback=True,
                                            digest=True) as w:
                stats = _stream_merge(plan, w, dev, nworkers, progress, cancel)
                size = w.total_size
                t_pipe = time.perf_counter()
            if w.digests:
                plan.report.output_sha256 = w.digests["sha256"]
                _store_output_hashes(hash_cache, out, w.digests)
            if os.environ.get("SDTOOLKIT_MERGE_STATS"):  # the bench's split of the time (stderr, one JSON line)
                stats.update(setup=t_open - t0, pipeline=t_pipe - t_open, fsync_rename=time.perf_counter() - t_pipe)
                print("sdtoolkit-merge-stats " + json.dumps({k: round(v, 3) for k, v in stats.items()}),
                      file=sys.stderr, flush=True)
        else:
            sd: Dict[str, torch.Tensor] = {}
            lock = threading.Lock()

            def work(it: _Item) -> None:
                t = plan.compute(it, dev)
                with lock:
                    sd[it.name] = t
            _run_items(plan, plan.items, work, nworkers, progress, cancel)
            ordered = {i.name: sd[i.name] for i in plan.items}
            save_ckpt(out, ordered, extra=dict(meta) if meta else None, overwrite=overwrite)
            size = out.stat().st_size
    finally:
        for s in sources.values():
            s.close()
    rep = plan.report
    rep.output = str(out)
    rep.bytes_written = int(size)
    rep.seconds = time.perf_counter() - t0
    return rep


# ---------------------------------------------------------------------------------------------------------------
# in memory

def _check_module_keys(plan: _Plan, target_sd: Mapping[str, torch.Tensor], arch: ArchInfo) -> None:
    """Before anything is written into a module: every UNet / VAE / text-encoder key of the merge must be one of
    the module's tensors with the same shape (a hijacked or differently named model would otherwise be merged only
    in part, silently). EMA, position_ids and other non-model keys the module lacks are skipped and counted."""
    from ..arch import component_of

    bad: List[str] = []
    for it in plan.items:
        dst = target_sd.get(it.name)
        if dst is None:
            comp = component_of(it.name, arch)
            if comp in ("ema", "junk", "marker") or it.action in ("fix_pos", "keep_pos"):
                plan.report.not_in_module.append(it.name)
                continue
            bad.append(it.name)
        elif tuple(dst.shape) != tuple(it.shape):
            raise ArchitectureError(f"the loaded model's tensor has shape {tuple(dst.shape)} but the merge's is "
                                    f"{tuple(it.shape)}; is the loaded model the same architecture as model A?",
                                    key=it.name)
    if bad:
        raise ArchitectureError(f"the loaded model has no tensor for {len(bad)} of the merge's keys (first: {bad[0]}); "
                                f"it is not a {arch.architecture} model with checkpoint key names, nothing was changed")


@dataclass
class MergeResult:
    """A merge held in memory: ``state_dict`` (or the ``module`` it was written into), its report and metadata.
    ``save(path)`` is the "save current merge" call."""

    report: MergeReport
    metadata: Dict[str, str]
    recipe: MergeRecipe
    state_dict: Optional[Dict[str, torch.Tensor]] = None
    module: Optional[torch.nn.Module] = None
    #: merged into a module: A's marker keys (``v_pred``, ``ztsnr``...), which a loaded model holds no tensor for;
    #: saving the merge writes them, so a v-pred model saved from the WebUI stays v-pred
    markers: Dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> Dict[str, torch.Tensor]:
        if self.state_dict is not None:
            return self.state_dict
        assert self.module is not None
        out = dict(self.module.state_dict())
        for k, t in self.markers.items():
            out.setdefault(k, t)
        return out

    def save(self, path: PathLike, overwrite: bool = False, dtype: Optional[str] = None) -> Path:
        """Write the merge (floats cast to ``dtype``, default the recipe's; ints untouched) atomically."""
        return save_current_merge(self, path, overwrite=overwrite, dtype=dtype)


def save_current_merge(result: MergeResult, path: PathLike, overwrite: bool = False,
                       dtype: Optional[str] = None) -> Path:
    from .recipe import DTYPES

    out = Path(path)
    check_output_path(out, [m for m in result.recipe.models if isinstance(m, str)], overwrite)
    target = DTYPES[dtype or result.recipe.dtype]
    sd = result.tensors()

    def dt(k: str, t: torch.Tensor) -> torch.dtype:  # markers as stored (hosts test the key), ints never cast
        return target if t.dtype.is_floating_point and not is_marker_key(k) else t.dtype

    if out.suffix.lower() == ".safetensors":
        specs = [(k, dt(k, t), tuple(t.shape)) for k, t in sd.items()]
        with StreamingSafetensorsWriter(out, specs, result.metadata or None, overwrite=overwrite) as w:
            for k, t in sd.items():
                w.write(k, t.detach().to("cpu", dt(k, t)).contiguous())
    else:
        save_ckpt(out, {k: t.detach().cpu().to(dt(k, t)) for k, t in sd.items()}, extra=dict(result.metadata),
                  overwrite=overwrite)
    return out


def merge_in_memory(recipe: MergeRecipe, a: Optional[StateLike] = None, b: Optional[StateLike] = None,
                    c: Optional[StateLike] = None, vae: Optional[StateLike] = None,
                    into: Optional[torch.nn.Module] = None, progress: Optional[Progress] = None,
                    workers: int = 1, names: Optional[Dict[str, str]] = None,
                    hash_cache: Union[HashCache, bool, None] = True,
                    hash_progress: Optional[HashProgress] = None,
                    select: Optional[Callable[[Any], bool]] = None) -> MergeResult:
    """Apply ``recipe`` without writing a file.

    ``a``/``b``/``c``/``vae`` override the recipe's paths with a path, a state dict or an ``nn.Module``. With
    ``into`` (typically the loaded model, also passed as ``a``), results are copied into the module's own tensors
    (cast once from float32 to each parameter's dtype, on its device) and nothing else is kept; keys the module
    lacks are skipped. Otherwise a new state dict in the recipe's dtype is returned. Integer tensors and
    position_ids follow the same rules as :func:`merge_files`; so do ``hash_cache`` and ``hash_progress`` (inputs
    given as files only).

    ``select(item)`` (with ``into`` only): called once per planned output key before anything is computed (``item``
    has ``name``, ``action``, ``block``, ``partial``); keys it answers False for are neither computed nor written
    (the XY grid rewrites only the keys whose inputs changed since the previous cell)."""
    t0 = time.perf_counter()
    recipe.validate()
    dev = _device(recipe)
    if a is None and into is not None:
        a = into
    sources = _open_sources(recipe, a, b, c, vae)
    try:
        ab = [sources[n] for n in ("A", "B", "C") if n in sources]
        arch, _ = _check_arch(ab)
        target_sd = into.state_dict() if into is not None else None
        dtype_for = None
        if target_sd is not None:
            def dtype_for(name: str, src: torch.dtype) -> torch.dtype:
                t = target_sd.get(name)
                if t is not None:
                    return t.dtype
                return recipe.torch_dtype if src.is_floating_point else src
        plan = _Plan(recipe, ab[0], ab[1:], sources.get("VAE"), arch, dtype_for)
        hashes = _hashes_for(recipe, sources, hash_cache, hash_progress)
        plan.report.input_sha256 = {n: h[0] for n, h in hashes.items()}
        meta = build_metadata(recipe, sources, hashes, arch, None, names, plan.report) if recipe.save_metadata else {}
        result_sd: Dict[str, torch.Tensor] = {}
        markers: Dict[str, torch.Tensor] = {}
        lock = threading.Lock()
        if target_sd is not None:
            _check_module_keys(plan, target_sd, arch)
            # each output key depends only on the same key of the inputs, and is fully computed (into a
            # separate buffer) before it is copied into the module, so A may be the module itself
            def work(it: _Item) -> None:
                dst = target_sd.get(it.name)
                if dst is None:
                    if is_marker_key(it.name):  # kept beside the module, written by save_current_merge
                        t = plan.compute(it, dev)
                        with lock:
                            markers[it.name] = t
                    return
                if tuple(dst.shape) != tuple(it.shape):
                    raise ArchitectureError(f"module tensor shape {tuple(dst.shape)} differs from the merge's "
                                            f"{tuple(it.shape)}", key=it.name)
                res = plan.compute(it, dev)
                with torch.no_grad():
                    dst.copy_(res)
            todo = plan.items if select is None else [i for i in plan.items if select(i)]
            _run_items(plan, todo, work, workers, progress)
        else:
            def work(it: _Item) -> None:
                res = plan.compute(it, dev)
                with lock:
                    result_sd[it.name] = res
            _run_items(plan, plan.items, work, workers, progress)
            result_sd = {i.name: result_sd[i.name] for i in plan.items}
    finally:
        for s in sources.values():
            s.close()
    rep = plan.report
    rep.seconds = time.perf_counter() - t0
    if into is not None:
        return MergeResult(rep, meta, recipe, module=into, markers=markers)
    return MergeResult(rep, meta, recipe, state_dict=result_sd)


__all__ = ["MergeReport", "MergeResult", "merge_files", "merge_in_memory", "save_current_merge", "build_metadata",
           "input_hashes", "HASH_ALGOS", "Progress", "HashProgress", "CHUNK_ELEMENTS"]
