"""Apply networks to live modules: in place with exact restore (:class:`LoraPatcher`) or through forward hooks
(:class:`FunctionalLora`).

Targets are named by checkpoint keys (``model.diffusion_model.input_blocks.1.1.proj_in.weight``); a
:class:`ModelBinding` resolves them to the parameters of whatever modules hold the model: the WebUI's
``LatentDiffusion`` (parameter names *are* checkpoint keys), a bare ldm ``UNetModel``, diffusers'
``UNet2DConditionModel``, transformers' CLIP text models (also where the checkpoint holds OpenCLIP: q/k/v rows of the
fused ``in_proj_weight`` map onto ``q_proj``/``k_proj``/``v_proj``), or an OpenCLIP ``nn.MultiheadAttention``
(``in_proj_weight`` rows patched in place).

In-place patching, per parameter:

* the first time a parameter is touched, its own storage becomes the backup (no copy; a copy on ``backup_device``
  when one is given) and W = backup in fp32 + Σ m·ΔW (each ΔW computed in fp32 against the *original* weight; plain
  LoRA factors fused into one ``addmm``), cast once to the parameter's dtype, goes to a new tensor swapped in as
  ``param.data``; later patches of the same parameter write into that tensor; restoring swaps the original back
  (bit-identical by construction). The parameter object never changes, only its storage (code that caches a
  weight's data pointer, e.g. a captured CUDA graph, must be re-captured after a change of LoRA set);
* every parameter remembers the signature of what it holds (network, layer, effective multiplier, dyn); switching
  from one set to another recomputes only the parameters whose signature changed; a parameter that no network
  touches any more is restored from its backup and the patched copy is freed, so memory
  does not grow however often the set changes;
* the same request again is answered from the last key without touching anything.

The effective multiplier of a layer = (te or unet weight by the layer's component) x its block weight, so block
weights and dyn are part of every cache key.

Bad networks (wrong architecture, ranks that do not fit, NaN/inf) are refused as a whole before any weight is
written; the others are applied and the result lists the errors (file and layer named).
"""
from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import detect, keymaps
from ..arch.families import base_arch
from ..errors import SdToolkitError
from . import formats
from .backups import BackupStore, LoraBackupError
from .blocks import active_at_step, block_key, block_weight
from .network import UNKNOWN_TARGET, BoundLayer, Network, check_shapes, partly_text

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- binding

@dataclass
class ParamRef:
    module: nn.Module
    attr: str
    rows: Optional[slice] = None

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def unwrap_name(name: str) -> str:
    """A parameter name without the ``wrapped`` components the WebUI's hijack adds
    (``cond_stage_model.wrapped.transformer.x`` -> ``cond_stage_model.transformer.x``)."""
    if "wrapped" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "wrapped")


def loaded_architecture(params: Iterable[Tuple[str, Any]], prefix: str = "") -> Optional[str]:
    """The checkpoint architecture (SD1, SD2, SDXL, SDXL-refiner) of a loaded model, told by the library's own
    detector (:func:`lib_sdtoolkit.arch.detect`) from parameter names and shapes only - no tensor data is read.

    ``params``: ``model.named_parameters()`` or ``(name, shape)`` pairs, named as checkpoint keys under ``prefix``
    (the WebUI hijack's ``wrapped`` components are dropped). Hosts' own flags cannot tell a refiner from SDXL (A1111
    and Forge set ``is_sdxl`` for both) and the two need different name tables and block lists. None when the
    detector recognises no checkpoint architecture."""
    shapes = {prefix + unwrap_name(n): tuple(getattr(p, "shape", p)) for n, p in params}
    info = detect(shapes)
    return info.architecture if info.is_checkpoint else None


@contextlib.contextmanager
def _exact_maths() -> Iterator[None]:
    """Weights are written with autocast off (the WebUI activates networks inside ``devices.autocast()``, which
    would run the ΔW matmuls in fp16) and outside inference mode (the new tensors become parameters' data)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _split_name(name: str) -> Tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


class ModelBinding:
    """Checkpoint parameter keys -> parameters of live modules, for one architecture."""

    def __init__(self, arch: str):
        self.arch = base_arch(arch)
        self._params: Dict[str, Tuple[nn.Module, str]] = {}
        #: (fused in_proj key, qkv index) -> separate q/k/v parameter (HF CLIP bound where the checkpoint is OpenCLIP)
        self._split: Dict[Tuple[str, int], Tuple[nn.Module, str]] = {}
        #: id(out_proj) -> its nn.MultiheadAttention (whose forward uses out_proj.weight directly)
        self.mha_parent: Dict[int, nn.Module] = {}

    # -- building
    def _add_module(self, module: nn.Module, rename: Callable[[str], Optional[Tuple[str, Optional[int]]]]) -> None:
        mods = dict(module.named_modules())
        for m in mods.values():
            if isinstance(m, nn.MultiheadAttention):
                self.mha_parent[id(m.out_proj)] = m
        for name, _ in module.named_parameters():
            mname, attr = _split_name(name)
            res = rename(name)
            if res is None:
                continue
            key, idx = res
            owner = mods[mname]
            if idx is None:
                self._params[key] = (owner, attr)
            else:
                self._split[(key, idx)] = (owner, attr)

    @classmethod
    def from_checkpoint_module(cls, model: nn.Module, arch: str, prefix: str = "") -> "ModelBinding":
        """A module whose parameter names are checkpoint keys (the WebUI's ``sd_model``), optionally under
        ``prefix`` (``prefix="model.diffusion_model."`` for a bare ldm ``UNetModel``).

        The WebUI's hijack wraps the text encoders (``cond_stage_model`` / ``conditioner.embedders.N`` become
        ``...WithCustomWords`` modules holding the original as ``.wrapped``, and ``token_embedding`` an
        ``EmbeddingsWithFixes`` with ``.wrapped``): ``wrapped`` path components are dropped to get the key.

        A diffusers ``UNet2DConditionModel`` sitting where the ldm/sgm UNet belongs (``model.diffusion_model``,
        e.g. an SDXL model assembled from diffusers parts) is bound through the diffusers -> ldm key map."""
        b = cls(arch)
        unet = dict(model.named_modules()).get("model.diffusion_model") if not prefix else None
        if unet is not None and not hasattr(unet, "input_blocks") and hasattr(unet, "down_blocks"):
            b._add_module(model, lambda n: None if n.startswith("model.diffusion_model.")
                          else (unwrap_name(n), None))
            b.add_unet(unet)
            return b
        b._add_module(model, lambda n: (prefix + unwrap_name(n), None))
        return b

    @classmethod
    def from_parts(cls, arch: str, unet: Optional[nn.Module] = None, text_encoder: Optional[nn.Module] = None,
                   text_encoder_2: Optional[nn.Module] = None) -> "ModelBinding":
        """Bind separate modules: ``unet`` as ldm/sgm ``UNetModel`` or diffusers ``UNet2DConditionModel``,
        text encoders as transformers CLIP models (or modules in checkpoint layout)."""
        b = cls(arch)
        if unet is not None:
            b.add_unet(unet)
        for comp, mod in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if mod is not None:
                b.add_text_encoder(mod, comp)
        return b

    def add_unet(self, unet: nn.Module) -> "ModelBinding":
        up = keymaps.UNET_PREFIX
        if hasattr(unet, "input_blocks"):
            self._add_module(unet, lambda n: (up + n, None))
        else:
            arch = self.arch

            def ren(n: str) -> Optional[Tuple[str, Optional[int]]]:
                try:
                    return up + keymaps.unet_diffusers_key_to_ldm(n, arch), None
                except (KeyError, ValueError):
                    return None
            self._add_module(unet, ren)
        return self

    def add_text_encoder(self, te: nn.Module, component: str = "text_encoder") -> "ModelBinding":
        specs = {c: (p, fmt) for c, p, fmt in keymaps.TEXT_PREFIXES.get(self.arch, [])}
        if component not in specs:
            raise SdToolkitError(f"a {self.arch} model has no {component}")
        prefix, fmt = specs[component]
        hf = hasattr(te, "text_model")
        if fmt == "hf" or not hf:
            self._add_module(te, lambda n: (prefix + n, None))
        else:
            def ren(n: str) -> Optional[Tuple[str, Optional[int]]]:
                try:
                    k, idx = keymaps.hf_clip_key_to_openclip(n)
                except (KeyError, ValueError):
                    return None
                return prefix + k, idx
            self._add_module(te, ren)
        return self

    # -- lookup
    def resolve(self, key: str, qkv: Optional[int] = None) -> Optional[ParamRef]:
        if qkv is not None and (key, qkv) in self._split:
            m, a = self._split[(key, qkv)]
            return ParamRef(m, a)
        ent = self._params.get(key)
        if ent is None:
            return None
        m, a = ent
        if qkv is None:
            return ParamRef(m, a)
        n = getattr(m, a).shape[0] // 3
        return ParamRef(m, a, slice(qkv * n, (qkv + 1) * n))

    def target_shape(self, key: str) -> Optional[Tuple[int, ...]]:
        ent = self._params.get(key)
        if ent is not None:
            return tuple(getattr(ent[0], ent[1]).shape)
        parts = [self._split.get((key, i)) for i in range(3)]
        if all(p is not None for p in parts):
            s = tuple(getattr(parts[0][0], parts[0][1]).shape)
            return (s[0] * 3, *s[1:])
        return None

    def shapes_for(self, net: Network) -> Dict[str, Tuple[int, ...]]:
        out: Dict[str, Tuple[int, ...]] = {}
        for layer in net.layers:
            s = self.target_shape(layer.weight_key)
            if s is not None:
                out[layer.weight_key] = s
        return out

    def __len__(self) -> int:
        return len(self._params) + len(self._split)


# --------------------------------------------------------------------------------------------------- requests

@dataclass
class ActiveNetwork:
    """One network as asked for: multipliers, dyn, block weights, step range."""

    network: Network
    te: float = 1.0
    unet: float = 1.0
    dyn: Optional[int] = None
    block_weights: Optional[Mapping[str, float]] = None
    start: Optional[int] = None
    stop: Optional[int] = None

    @property
    def net_id(self) -> tuple:
        n = self.network
        return (str(n.path), n.mtime, n.name, id(n))

    def key(self) -> tuple:
        return (self.net_id, float(self.te), float(self.unet), self.dyn, block_key(self.block_weights),
                self.start, self.stop)

    def multiplier(self, layer: BoundLayer) -> float:
        m = self.te if layer.component.startswith("text_encoder") else self.unet
        if self.block_weights is not None:
            m *= block_weight(self.block_weights, layer.block)
        return float(m)


@dataclass
class ApplyResult:
    applied: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    touched: int = 0          # parameters rewritten or restored by this call
    warnings: List[str] = field(default_factory=list)  # networks applied partly, with the reasons
    cached: bool = False      # True when nothing had to be done

    def __bool__(self) -> bool:
        return not self.errors


_Contribution = Tuple[tuple, BoundLayer, float, Optional[int], Optional[slice]]


def _group(bind: ModelBinding, active: Sequence[ActiveNetwork]) -> Dict[Tuple[int, str], Tuple[ParamRef, List[_Contribution]]]:
    """{(id(module), attr): (ref, [(net key, layer, mult, dyn, rows)...])} for weights; bias handled alongside."""
    out: Dict[Tuple[int, str], Tuple[ParamRef, List[_Contribution]]] = {}
    for a in active:
        for layer in a.network.layers:
            m = a.multiplier(layer)
            if m == 0.0:
                continue
            ref = bind.resolve(layer.weight_key, layer.target.qkv_index)
            if ref is None:
                continue
            k = (id(ref.module), ref.attr)
            out.setdefault(k, (ref, []))[1].append((a.net_id, layer, m, a.dyn, ref.rows))
    return out


def _signature(contribs: List[_Contribution]) -> tuple:
    return tuple((c[0], c[1].weights.name, c[2], c[3], (c[4].start, c[4].stop) if c[4] else None) for c in contribs)


def _bias_ref(layer: BoundLayer, wref: ParamRef) -> Optional[ParamRef]:
    """The bias beside a weight (rows of ``in_proj_bias`` for a fused q/k/v target)."""
    if wref.attr == "in_proj_weight":
        return ParamRef(wref.module, "in_proj_bias", wref.rows) if wref.module.in_proj_bias is not None else None
    b = getattr(wref.module, "bias", None)
    return ParamRef(wref.module, "bias", wref.rows) if isinstance(b, torch.Tensor) else None


class _Base(abc.ABC):
    def __init__(self, binding: ModelBinding, compute_device: Optional[torch.device] = None):
        self.binding = binding
        self.compute_device = compute_device
        self._valid: Dict[tuple, Optional[str]] = {}
        self._last_key: Optional[tuple] = None
        self._requested: List[ActiveNetwork] = []
        self._step: Optional[int] = None

    def _validate(self, a: ActiveNetwork) -> Optional[str]:
        k = (a.net_id, a.dyn)
        if k not in self._valid:
            try:
                check_shapes(a.network, self.binding.shapes_for(a.network), a.dyn)
                if not any(self.binding.resolve(layer.weight_key, layer.target.qkv_index) is not None
                           for layer in a.network.layers):
                    raise SdToolkitError("no layer of this network is in the bound model", a.network.path)
                self._valid[k] = None
            except SdToolkitError as e:
                self._valid[k] = str(e)
        return self._valid[k]

    def _select(self, active: Sequence[ActiveNetwork], result: ApplyResult) -> List[ActiveNetwork]:
        ok = []
        for a in active:
            err = self._validate(a)
            if err:
                result.errors.append(err)
                log.warning("sdtoolkit lora: %s", err)
                continue
            if self._step is not None and not active_at_step(self._step, a.start, a.stop):
                continue
            ok.append(a)
            result.applied.append(a.network.name)
            partly = self._partly(a)
            if partly:
                result.warnings.append(partly)
        return ok

    def _partly(self, a: ActiveNetwork) -> Optional[str]:
        """The modules of an applied network that are not applied, with their reasons (once per network: logged
        as a warning the first time; ``lora inspect FILE --model CHECKPOINT`` lists them all)."""
        key = ("partly", a.net_id)
        if key not in self._valid:
            net = a.network
            skipped = net.not_applied() + [
                (layer.weights.name, UNKNOWN_TARGET) for layer in net.layers
                if self.binding.resolve(layer.weight_key, layer.target.qkv_index) is None]
            total = len(net.layers) + len(net.unmatched) + len(net.unknown_type)
            self._valid[key] = partly_text(net.name, total, skipped) if skipped else None
            if skipped:
                log.warning("sdtoolkit lora: %s", self._valid[key])
        return self._valid[key]

    def set_step(self, step: Optional[int]) -> ApplyResult:
        """Sampling step (for start=/stop= ranges): re-selects the active networks; cheap when nothing changes."""
        self._step = step
        return self.set_networks(self._requested)

    @abc.abstractmethod
    def set_networks(self, active: Sequence[ActiveNetwork]) -> ApplyResult:
        """Make exactly these networks active (patched weights or forward hooks)."""


class LoraPatcher(_Base):
    """In-place patching with exact restore.

    ``backup`` says where the original of each touched weight is kept (:mod:`lib_sdtoolkit.lora.backups`):

    * ``"file"`` (the default when ``source`` is given: the checkpoint file the weights were loaded from): nothing
      is kept; each original is read back from the file, which is checked per tensor, bit for bit, at the weight's
      first touch, and by its identity before every read;
    * ``"spill"`` (the default otherwise): the originals go to an unlinked temporary file (``spill_dir``);
    * ``"ram"`` (or ``backup_device`` given): the parameter's own storage becomes the backup and the patched values
      go to a new tensor swapped in as ``param.data`` (zero-copy, the fastest switches, one extra copy of every
      touched weight in memory; on ``backup_device`` the backup is a copy). Also the fallback where a spill write
      fails; ``file`` falls back to ``spill`` per weight where the file cannot vouch for it. ``backup_stats`` says
      what each weight got and why.

    With ``file`` and ``spill`` the patched values are written into the parameter's own storage, so the memory
    overhead is the LoRA's factors plus one layer's temporaries (the original read back, one fp32 accumulator
    reused across layers). For plain LoRA/LoCon factors the new value is one fused ``W0 + α·up@down`` (``addmm``);
    other types compute their ΔW in fp32 per layer against the original.

    Weights written by someone else after we patched them (a checkpoint loaded into the same modules) are noticed
    from the parameter's identity and version counter: their backup is dropped, never restored over the new
    values."""

    def __init__(self, binding: ModelBinding, compute_device: Optional[torch.device] = None,
                 backup_device: Optional[torch.device] = None, backup: str = "auto",
                 source: Optional[Any] = None, spill_dir: Optional[Any] = None):
        super().__init__(binding, compute_device)
        self.backup_device = torch.device(backup_device) if backup_device is not None else None
        names = {(id(m), a): key for key, (m, a) in binding._params.items()} if source else {}
        self._store = BackupStore(backup, source, names, spill_dir, self.backup_device)
        #: key -> the ParamRef of a parameter with a backup
        self._backup: Dict[Tuple[int, str], ParamRef] = {}
        self._sig: Dict[Tuple[int, str], tuple] = {}
        self._bias_of: Dict[Tuple[int, str], Tuple[int, str]] = {}
        #: key -> (id of the tensor we wrote, its version counter right after our write)
        self._written: Dict[Tuple[int, str], Tuple[int, int]] = {}
        self._buf: Optional[torch.Tensor] = None

    @property
    def backup_kind(self) -> str:
        return self._store.kind

    @property
    def backup_bytes(self) -> int:
        """Bytes of original weights this patcher keeps in memory (RAM backups only)."""
        return self._store.ram_bytes

    @property
    def backup_stats(self) -> Dict[str, Any]:
        """What the current backups are: counts per kind, bytes in RAM and in the spill file, and every fallback
        (weight, reason) since the patcher was made."""
        return {"kind": self._store.kind, "count": self._store.counts(), "ram_bytes": self._store.ram_bytes,
                "spill_bytes": self._store.spill_bytes, "spill_dir": self._store.spill_path,
                "fallbacks": list(self._store.fallbacks)}

    # -- bookkeeping
    def _mark_written(self, k: Tuple[int, str], t: torch.Tensor) -> None:
        self._written[k] = (id(t), t._version)

    def _changed(self, k: Tuple[int, str]) -> bool:
        w = self._written.get(k)
        ref = self._backup.get(k)
        if w is None or ref is None:
            return False
        t = ref.tensor
        return id(t) != w[0] or t._version != w[1]

    def _drop_backup(self, k: Tuple[int, str]) -> None:
        self._backup.pop(k, None)
        self._store.drop(k)

    def _forget(self, k: Tuple[int, str]) -> None:
        """Drop what we know about ``k`` without writing it (its current value is someone else's)."""
        self._drop_backup(k)
        self._written.pop(k, None)
        self._sig.pop(k, None)
        bk = self._bias_of.pop(k, None)
        if bk is not None:
            if self._changed(bk):
                self._forget(bk)
            else:
                self._restore(bk)

    def forget_changed(self) -> int:
        """Forget (without restoring) every parameter changed by someone else since we wrote it. Returns how many.
        Called by :meth:`set_networks`; cheap (one version check per touched parameter)."""
        stale = [k for k in self._written if self._changed(k)]
        for k in stale:
            self._forget(k)
        if stale:
            self._last_key = None
        return len(stale)

    def _ensure_backup(self, ref: ParamRef) -> torch.Tensor:
        """Back ``ref``'s parameter up at its first touch; return its original value (the kept tensor, the
        parameter's own data before the first write, or a one-layer temporary read back)."""
        k = (id(ref.module), ref.attr)
        if k in self._backup and self._changed(k):
            self._forget(k)
        if k not in self._backup:
            _, orig = self._store.save(k, ref.tensor)
            self._backup[k] = ParamRef(ref.module, ref.attr)
            return orig
        return self._store.load(k)

    def _in_place(self, k: Tuple[int, str]) -> bool:
        return self._store.entry(k).kind != "ram"

    def _target(self, k: Tuple[int, str], ref: ParamRef) -> Tuple[torch.Tensor, bool]:
        """Where the patched value of ``k`` goes: the parameter's storage when it is not the backup's, else
        a fresh tensor (``True``) that :meth:`_commit` swaps in."""
        param = ref.tensor
        ent = self._store.entry(k)
        if ent.kind == "ram" and _same_storage(param, ent.tensor):
            return torch.empty(param.shape, dtype=param.dtype, device=param.device), True
        return param.detach(), False

    def _commit(self, k: Tuple[int, str], ref: ParamRef, out: torch.Tensor, fresh: bool) -> None:
        if fresh:
            ref.tensor.data = out
        self._mark_written(k, ref.tensor)

    def _restore(self, k: Tuple[int, str]) -> None:
        changed = self._changed(k)
        ref = self._backup.get(k)
        self._written.pop(k, None)
        try:
            if ref is not None and not changed:
                param = ref.tensor
                ent = self._store.entry(k)
                if ent.kind == "ram":
                    saved = ent.tensor
                    if not _same_storage(param, saved):
                        if (saved.device == param.device and saved.dtype == param.dtype
                                and saved.shape == param.shape and self.backup_device is None):
                            param.data = saved
                        else:
                            with torch.no_grad():
                                param.copy_(saved)
                else:
                    with torch.no_grad():
                        self._store.load(k, out=param.detach())
        finally:
            self._drop_backup(k)
        bk = self._bias_of.pop(k, None)
        if bk is not None:
            self._restore(bk)

    def _buffer(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        if self._buf is None or self._buf.numel() < n or self._buf.device != device:
            self._buf = torch.empty(n, dtype=torch.float32, device=device)
        return self._buf[:n].view(shape)

    # -- applying
    def set_networks(self, active: Sequence[ActiveNetwork]) -> ApplyResult:
        """Make the model hold exactly ``active`` (in order). Touches only parameters whose contributions changed."""
        self._requested = list(active)
        if self._written:
            self.forget_changed()
        ranged = any(a.start is not None or a.stop is not None for a in active)
        key = (tuple(a.key() for a in active), self._step if ranged else None)
        if key == self._last_key:
            return ApplyResult(applied=[a.network.name for a in active], cached=True)
        result = ApplyResult()
        chosen = self._select(active, result)
        groups = _group(self.binding, chosen)
        try:
            with _exact_maths():
                for k in list(self._sig):
                    if k not in groups:
                        self._restore(k)
                        del self._sig[k]
                        result.touched += 1
                for k, (ref, contribs) in groups.items():
                    sig = _signature(contribs)
                    if self._sig.get(k) == sig:
                        continue
                    self._sig.pop(k, None)
                    self._patch(k, ref, contribs)
                    self._sig[k] = sig
                    result.touched += 1
        finally:
            self._buf = None
        self._last_key = key
        return result

    def _patch(self, k: Tuple[int, str], ref: ParamRef, contribs: List[_Contribution]) -> None:
        try:
            self._patch_inner(k, ref, contribs)
        except BaseException:
            self._restore(k)    # never leave a half-written parameter behind
            raise

    def _patch_inner(self, k: Tuple[int, str], ref: ParamRef, contribs: List[_Contribution]) -> None:
        orig = self._ensure_backup(ref)
        param = ref.tensor
        dev = self.compute_device or param.device
        out, fresh = self._target(k, ref)
        # accumulate W0 + Σ m·ΔW in fp32: straight into the output when it is an fp32 tensor on the compute device
        direct = out.dtype == torch.float32 and out.device == dev and out.is_contiguous()
        if direct and _same_storage(orig, out):
            orig = orig.clone()    # in-place backups: the first write would overwrite the original being read
        acc = out if direct else self._buffer(param.shape, dev)
        acc2 = acc.view(acc.shape[0], -1) if acc.dim() > 1 else acc
        started = False
        bias_acc: Optional[torch.Tensor] = None
        bias_ref: Optional[ParamRef] = None
        for _, layer, mult, dyn, rows in contribs:
            fac = formats.lowrank_factors(layer.weights, dyn, dev) if acc.dim() > 1 else None
            if fac is not None:
                up, down, s = fac
                target = acc2 if rows is None else acc2[rows]
                if tuple(target.shape) != (up.shape[0], down.shape[1]):
                    raise SdToolkitError(f"{layer.weights.name}: factors {list(up.shape)} x {list(down.shape)} do "
                                         f"not fit {list(target.shape)}")
                if not started and rows is None and orig.device == dev and orig.dtype == torch.float32:
                    torch.addmm(orig.reshape(acc2.shape), up, down, alpha=s * mult, out=acc2)
                else:
                    if not started:
                        acc.copy_(orig)
                    target.addmm_(up, down, alpha=s * mult)
                started = True
                del up, down
                continue
            if not started:
                acc.copy_(orig)
                started = True
            base = orig if rows is None else orig[rows]
            dw, db = formats.compute_delta(layer.weights, base, dyn, device=dev)
            (acc if rows is None else acc[rows]).add_(dw, alpha=mult)
            del dw
            if db is None:
                continue
            br = _bias_ref(layer, ParamRef(ref.module, ref.attr, rows))
            if br is None:
                continue
            if bias_acc is None:
                bias_ref = ParamRef(br.module, br.attr)
                bias_acc = self._ensure_backup(bias_ref).to(dev, dtype=torch.float32, copy=True)
            (bias_acc if br.rows is None else bias_acc[br.rows]).add_(db.to(dev), alpha=mult)
        if not started:
            acc.copy_(orig)
        if not direct:
            out.copy_(acc)
        self._commit(k, ref, out, fresh)
        old_bias = self._bias_of.pop(k, None)
        if bias_acc is not None and bias_ref is not None:
            bk = (id(bias_ref.module), bias_ref.attr)
            bout, bfresh = self._target(bk, bias_ref)
            bout.copy_(bias_acc)
            self._commit(bk, bias_ref, bout, bfresh)
            self._bias_of[k] = bk
        elif old_bias is not None:
            self._restore(old_bias)

    def restore_all(self) -> int:
        """Put every touched parameter back (bit-identical) and free the backups. Returns how many. A parameter
        changed by someone else since we wrote it is left as it is."""
        n = 0
        errors: List[str] = []
        with _exact_maths():
            for k in list(self._backup):
                if k in self._backup:
                    try:
                        self._restore(k)
                    except LoraBackupError as e:
                        errors.append(str(e))
                    n += 1
        self._sig.clear()
        self._written.clear()
        self._bias_of.clear()
        self._last_key = None
        self._requested = []
        if errors:
            raise LoraBackupError(f"{len(errors)} weight(s) could not be restored exactly: " + "; ".join(errors[:5]))
        return n

    def close(self) -> None:
        """Restore everything and release the backup store (its temporary file, the source descriptor)."""
        try:
            self.restore_all()
        finally:
            self._store.close()


# --------------------------------------------------------------------------------------------------- functional

@dataclass
class _Term:
    """One network's contribution to one parameter, as the forward hooks compute it."""

    layer: BoundLayer
    mult: float
    dyn: Optional[int]
    rows: Optional[slice]
    #: (up (out, r), down (r, in·k·k), scale·mult) for a plain LoRA/LoCon layer run as two small products; None
    #: where ΔW is computed inside the forward (other types, DoRA, CP, bias deltas, grouped convs)
    lowrank: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None


_HOOKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


class FunctionalLora(_Base):
    """Adds Σ m·ΔW·x in the forward pass through forward hooks; weights are never written, so it composes with
    whoever owns the weights (the WebUI's built-in Lora extension merges its own networks into them lazily).

    Memory: the hooks keep the LoRA factors (fp32 on the parameter's device) and never a full ΔW. A plain LoRA/LoCon
    layer of an ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (groups 1, zero padding) runs as two small products,
    ``up(down(x))``; every other case (LoHa, LoKr, full, IA3, norm, DoRA, CP LoCon, bias deltas, grouped convs) computes
    its ΔW inside the forward from the file's tensors, one layer at a time, and frees it. An ``nn.MultiheadAttention``
    (OpenCLIP's fused attention) is recomputed with W+ΔW inside its hook (its out_proj is used by the attention call
    directly, so it is handled there too; ΔW of that one layer is the temporary). Types whose ΔW depends on the
    weight (DoRA, IA3) see the original weight: the built-in Lora extension's CPU backup of the module where it has
    merged networks into it (``network_weights_backup``), else the parameter itself."""

    def __init__(self, binding: ModelBinding, compute_device: Optional[torch.device] = None):
        super().__init__(binding, compute_device)
        self._terms: Dict[int, Dict[str, List[_Term]]] = {}
        self._sig: Dict[Tuple[int, str], tuple] = {}
        self._hooks: Dict[int, Any] = {}
        self._modules: Dict[int, nn.Module] = {}
        self._factors: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def kept_bytes(self) -> int:
        """Bytes of the tensors the hooks keep alive between forwards: the LoRA factors (each counted once)."""
        seen: Dict[Tuple[int, int], int] = {}
        for per in self._terms.values():
            for terms in per.values():
                for t in terms:
                    if t.lowrank is not None:
                        for x in t.lowrank[:2]:
                            seen[(x.data_ptr(), x.numel())] = x.numel() * x.element_size()
        return sum(seen.values())

    def kept_tensors(self) -> List[Tuple[Tuple[int, str], torch.Tensor]]:
        """((id(module), attr), tensor) for every tensor the hooks keep (for accounting)."""
        out = []
        for mid, per in self._terms.items():
            for attr, terms in per.items():
                for t in terms:
                    if t.lowrank is not None:
                        out += [((mid, attr), x) for x in t.lowrank[:2]]
        return out

    def set_networks(self, active: Sequence[ActiveNetwork]) -> ApplyResult:
        self._requested = list(active)
        key = (tuple(a.key() for a in active), self._step)
        if key == self._last_key:
            return ApplyResult(applied=[a.network.name for a in active], cached=True)
        result = ApplyResult()
        chosen = self._select(active, result)
        groups = _group(self.binding, chosen)
        with _exact_maths():
            for k in list(self._sig):
                if k not in groups:
                    self._drop(k)
                    result.touched += 1
            for k, (ref, contribs) in groups.items():
                sig = _signature(contribs)
                if self._sig.get(k) == sig:
                    continue
                self._build(k, ref, contribs)
                self._sig[k] = sig
                result.touched += 1
        live = {(c[0], c[1].weights.name, c[3]) for _, contribs in groups.values() for c in contribs}
        for fk in [fk for fk in self._factors if fk[:3] not in live]:
            del self._factors[fk]
        self._last_key = key if not result.errors else None
        return result

    def _lowrank(self, ref: ParamRef, c: _Contribution) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
        net_id, layer, mult, dyn, rows = c
        mod = ref.module
        param = ref.tensor
        if isinstance(mod, nn.Linear):
            if rows is not None or ref.attr != "weight":
                return None
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1 or mod.padding_mode != "zeros" or ref.attr != "weight":
                return None
        elif not (isinstance(mod, nn.MultiheadAttention) and ref.attr == "in_proj_weight"):
            return None
        dev = self.compute_device or param.device
        fk = (net_id, layer.weights.name, dyn, str(dev))
        if fk not in self._factors:
            fac = formats.lowrank_factors(layer.weights, dyn, dev)
            if fac is None:
                return None
            self._factors[fk] = fac
        up, down, s = self._factors[fk]
        return up, down, s * mult

    def _build(self, k: Tuple[int, str], ref: ParamRef, contribs: List[_Contribution]) -> None:
        terms = [_Term(c[1], c[2], c[3], c[4], self._lowrank(ref, c)) for c in contribs]
        mod = ref.module
        self._terms.setdefault(id(mod), {})[ref.attr] = terms
        parent = self.binding.mha_parent.get(id(mod))
        self._install(parent if parent is not None else mod)

    def _drop(self, k: Tuple[int, str]) -> None:
        mid, attr = k
        d = self._terms.get(mid)
        if d is not None:
            d.pop(attr, None)
            if not d:
                del self._terms[mid]
                parent = self.binding.mha_parent.get(mid)
                hid = id(parent) if parent is not None else mid
                if hid not in self._terms and not (parent is not None and id(parent.out_proj) in self._terms):
                    h = self._hooks.pop(hid, None)
                    if h is not None:
                        h.remove()
                    self._modules.pop(hid, None)
        self._sig.pop(k, None)

    def _install(self, mod: nn.Module) -> None:
        if id(mod) in self._hooks:
            return
        if isinstance(mod, nn.MultiheadAttention):
            h = mod.register_forward_hook(self._mha_hook, with_kwargs=True)
        elif isinstance(mod, _HOOKABLE):
            h = mod.register_forward_hook(self._hook)
        else:
            # out_proj of an MultiheadAttention is a NonDynamicallyQuantizableLinear (an nn.Linear): handled above
            raise SdToolkitError(f"functional mode cannot hook a {type(mod).__name__}")
        self._hooks[id(mod)] = h
        self._modules[id(mod)] = mod

    # -- the maths inside the forward
    @staticmethod
    def _original(mod: nn.Module, attr: str, owner: Optional[nn.Module] = None) -> torch.Tensor:
        """The weight before anyone merged networks into it: the built-in Lora's CPU backup where it has one."""
        param = getattr(mod, attr)
        bk = getattr(owner if owner is not None else mod, "network_weights_backup", None)
        if isinstance(bk, tuple):
            bk = bk[0] if attr == "in_proj_weight" else bk[1] if owner is not None else None
        if isinstance(bk, torch.Tensor) and tuple(bk.shape) == tuple(param.shape):
            return bk
        return param.detach()

    def _delta(self, mod: nn.Module, attr: str, terms: List[_Term], dev: torch.device,
               owner: Optional[nn.Module] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Σ m·ΔW (fp32) of one parameter, and the bias delta: the one layer's temporary."""
        param = getattr(mod, attr)
        dw = torch.zeros(param.shape, dtype=torch.float32, device=dev)
        db: Optional[torch.Tensor] = None
        base: Optional[torch.Tensor] = None
        for t in terms:
            target = dw if t.rows is None else dw[t.rows]
            if t.lowrank is not None:
                up, down, a = t.lowrank
                target.view(target.shape[0], -1).addmm_(up, down, alpha=a)
                continue
            if base is None:
                base = self._original(mod, attr, owner)
            d, b = formats.compute_delta(t.layer.weights, base if t.rows is None else base[t.rows], t.dyn, device=dev)
            target.add_(d, alpha=t.mult)
            del d
            if b is not None:
                if db is None:
                    db = torch.zeros(param.shape[0], dtype=torch.float32, device=dev)
                (db if t.rows is None else db[t.rows]).add_(b.to(dev), alpha=t.mult)
        return dw, db

    def _term_out(self, mod: nn.Module, t: _Term, x: torch.Tensor) -> torch.Tensor:
        """ΔW_t·x for one term of a Linear/Conv/Norm module, in fp32."""
        if t.lowrank is not None:
            up, down, a = t.lowrank
            if isinstance(mod, nn.Linear):
                return F.linear(F.linear(x, down), up).mul_(a)
            w = mod.weight
            conv = F.conv2d if isinstance(mod, nn.Conv2d) else F.conv1d
            kdown = down.view(down.shape[0], *w.shape[1:])
            kup = up.view(up.shape[0], up.shape[1], *([1] * (w.dim() - 2)))
            return conv(conv(x, kdown, None, mod.stride, mod.padding, mod.dilation), kup).mul_(a)
        dw, db = self._delta(mod, "weight", [t], x.device)
        if isinstance(mod, nn.Linear):
            return F.linear(x, dw, db)
        if isinstance(mod, nn.Conv2d):
            return F.conv2d(x, dw, db, mod.stride, mod.padding, mod.dilation, mod.groups)
        if isinstance(mod, nn.Conv1d):
            return F.conv1d(x, dw, db, mod.stride, mod.padding, mod.dilation, mod.groups)
        if isinstance(mod, nn.GroupNorm):
            return F.group_norm(x, mod.num_groups, dw, db, mod.eps)
        return F.layer_norm(x, mod.normalized_shape, dw, db, mod.eps)

    def _hook(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        terms = self._terms.get(id(mod), {}).get("weight")
        if not terms:
            return out
        x = args[0].to(torch.float32)
        extra: Optional[torch.Tensor] = None
        for t in terms:
            y = self._term_out(mod, t, x)
            extra = y if extra is None else extra.add_(y)
        return out + extra.to(out.dtype)

    def _mha_hook(self, mod: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> Any:
        t_in = self._terms.get(id(mod), {}).get("in_proj_weight")
        t_out = self._terms.get(id(mod.out_proj), {}).get("weight")
        if not t_in and not t_out:
            return out
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if mod.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        w_in, b_in = mod.in_proj_weight, mod.in_proj_bias
        if t_in:
            dw, db = self._delta(mod, "in_proj_weight", t_in, w_in.device)
            w_in = w_in + dw.to(w_in.dtype)
            if db is not None and b_in is not None:
                b_in = b_in + db.to(b_in.dtype)
            del dw, db
        w_out, b_out = mod.out_proj.weight, mod.out_proj.bias
        if t_out:
            dw, db = self._delta(mod.out_proj, "weight", t_out, w_out.device, owner=mod)
            w_out = w_out + dw.to(w_out.dtype)
            if db is not None and b_out is not None:
                b_out = b_out + db.to(b_out.dtype)
            del dw, db
        res = F.multi_head_attention_forward(
            q, k, v, mod.embed_dim, mod.num_heads, w_in, b_in, mod.bias_k, mod.bias_v, mod.add_zero_attn,
            mod.dropout, w_out, b_out, training=mod.training,
            key_padding_mask=a.get("key_padding_mask"), need_weights=a.get("need_weights", True),
            attn_mask=a.get("attn_mask"), average_attn_weights=a.get("average_attn_weights", True),
            is_causal=a.get("is_causal", False))
        o, wts = res
        if mod.batch_first:
            o = o.transpose(0, 1)
        return o, wts

    def remove(self) -> None:
        """Remove every hook and the factors they keep."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self._terms.clear()
        self._factors.clear()
        self._sig.clear()
        self._modules.clear()
        self._last_key = None
        self._requested = []


__all__ = ["ModelBinding", "ParamRef", "ActiveNetwork", "ApplyResult", "LoraPatcher", "FunctionalLora",
           "loaded_architecture", "unwrap_name"]
