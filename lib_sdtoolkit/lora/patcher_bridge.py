"""Our networks as weight patches for a ComfyUI-style model patcher (Forge's ``backend/patcher``).

Forge owns the model's weights: a LoRA there is a set of *patches* keyed by the patcher's parameter names, added to a
clone of the UNet / CLIP patcher (``patcher.clone().add_patches(filename=..., patches={key: value}, strength_patch=s)``)
and merged into the weights by the patcher's own loader, which keeps the backup and restores it when the set of
patches changes. A patch value ``(type, payload)`` whose type is not built in is computed by
``extra_weight_calculators[type](weight_fp32, strength, payload)`` (Forge ``backend/patcher/lora.py``).

This module builds those patches from a parsed :class:`~lib_sdtoolkit.lora.network.Network` and computes them with
the same maths as :mod:`lib_sdtoolkit.lora.apply` (``formats.lowrank_factors`` / ``formats.compute_delta``), so every
format we read works there, with the multiplier of each layer - te/unet weight x its ``lbw=`` block weight - folded
into the payload: per-layer strength is something one ``add_patches`` call (one strength for all its keys) cannot
carry. Nothing here imports the host; the host's key map (kohya name -> patcher key) is passed in.

Two patcher shapes exist (tests/webui_double/forge/README.md): Forge 2.0.x's own (``add_patches(*, filename, patches,
strength_patch, strength_model, online_mode)``, sets kept in ``lora_patches``) and the ComfyUI ModelPatcher Forge Neo
moved to (``add_patches(patches, strength_patch, strength_model)``, patches appended per key);
:func:`add_patch_sets` adds a set once on either, :func:`key_map_of` reads either key-map return shape.

Flux.1 (Forge 2.0.x and Neo run it; A1111 does not): the patchers hold BFL's transformer under ``diffusion_model.``
(``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``...), CLIP-L under
``clip_l.transformer.`` and T5-XXL under ``t5xxl.transformer.``. A layer whose target is a slice of a fused weight
(diffusers' ``to_q``/``to_k``/``to_v`` on ``qkv``, ``proj_mlp`` on ``linear1``, XLabs' single-block ``qkv_lora``)
becomes a patch on ``(key, (0, first row, rows))`` - the hosts' own offset patch key (ComfyUI's and Forge's
``flux_to_diffusers`` key map writes the same): both hosts narrow the weight to those rows before calling the patch.
diffusers' ``norm_out.linear`` (scale|shift, BFL's ``final_layer.adaLN_modulation.1`` is shift|scale) carries
``swap`` in our payload, not as the key's ``function``: Forge 2.0.1 passes no ``function`` to an extra weight
calculator. :func:`flux_patcher_key` finds the key from the parameter names alone (BFL names are the patchers' own),
so a Flux LoRA in any naming we read lands where Forge's loader would put it.

What a patcher cannot carry: ``start=``/``stop=`` step ranges (the patcher merges once per sampling pass, not per
step) - :func:`build_patches` leaves them to the caller to report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..arch import keymaps
from ..arch.families import base_arch
from . import formats
from .apply import ActiveNetwork
from .formats import LayerWeights
from .names import is_flux, lora_names
from .network import BoundLayer

#: the patch type we register with the patcher
PATCH_TYPE = "sdtoolkit"


@dataclass(frozen=True)
class LayerPatch:
    """One network module on one patcher parameter: ``weight += strength * multiplier * ΔW`` (or the bias delta)."""

    weights: LayerWeights
    multiplier: float
    dyn: Optional[int] = None
    #: set for a bias patch: the shape of the module's weight (the bias delta is computed against it)
    bias_of_shape: Optional[Tuple[int, ...]] = None
    #: Flux: the file's ΔW has the two halves of its rows swapped against the weight (diffusers' ``norm_out``)
    swap: bool = False


def _swap(t: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged (diffusers' scale|shift <-> BFL's shift|scale)."""
    n = t.shape[0] // 2
    return torch.cat([t[n:], t[:n]], dim=0)


def apply_patch(weight: torch.Tensor, strength: float, patch: LayerPatch) -> torch.Tensor:
    """Add the patch to ``weight`` (the patcher's fp32 working copy, changed in place and returned)."""
    lw = patch.weights
    m = formats.effective_multiplier(lw, float(strength) * patch.multiplier)
    if m == 0.0:
        return weight
    if patch.bias_of_shape is not None:
        # the bias delta of every format depends only on the module's own factors; compute_delta shapes ΔW
        # against a weight of the module's shape, so it gets zeros of that shape (one layer's worth, freed here)
        base = torch.zeros(patch.bias_of_shape, dtype=torch.float32, device=weight.device)
        _, db = formats.compute_delta(lw, base, patch.dyn, device=weight.device)
        del base
        if db is not None:
            db = db.reshape(weight.shape)
            weight.add_((_swap(db) if patch.swap else db).to(weight.dtype), alpha=m)
        return weight
    fac = formats.lowrank_factors(lw, patch.dyn, weight.device) if weight.dim() > 1 else None
    if fac is not None:
        up, down, s = fac
        w2 = weight.view(weight.shape[0], -1)
        if tuple(w2.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(f"{lw.name}: factors {list(up.shape)} x {list(down.shape)} do not fit "
                             f"{list(weight.shape)}")
        # the hosts' own order (Forge 2.0.1 merge_lora_to_weight, ComfyUI/Neo LoRAAdapter.calculate_weight):
        # ΔW = up @ down, scaled by strength x alpha/rank, then added - so <sdtlora:x:s> lands on the very bits
        # <lora:x:s> does. A fused addmm rounds differently (about 1 ulp), and a 1-ulp change of the weights can
        # change a sampled image by many levels (measured in the real Forge 2.0.1: see tests/test_forge_lora_bridge)
        dw = torch.mm(up.to(weight.dtype), down.to(weight.dtype)).mul_(s * m)
        w2.add_(_swap(dw) if patch.swap else dw)
        return weight
    own = _swap(weight) if patch.swap else weight   # the file's ΔW is for the weight in its own row order
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    raw = formats.unscaled_delta(lw, own, patch.dyn, device=weight.device, dtype=dtype)
    if raw is not None:
        # LoKr / LoHa / full diffs: one multiply by scale x strength, as the hosts do (a scaled ΔW times the strength
        # rounds twice: 1 ulp apart from Forge 2.0.1's own <lora> in fp32, measured on its Flux model), in the
        # weight's dtype (Forge's on-the-fly LoRA for fp8 storage computes in bf16/fp16: measured there too)
        dw = raw[0].mul_(raw[1] * m)
        weight.add_((_swap(dw) if patch.swap else dw).to(weight.dtype))
        return weight
    if lw.dora_scale is not None and weight.dim() > 1:
        return _dora(weight, own, lw, patch, m, dtype)
    dw, _ = formats.compute_delta(lw, own, patch.dyn, device=weight.device)
    weight.add_((_swap(dw) if patch.swap else dw).to(weight.dtype), alpha=m)
    return weight


def _dora(weight: torch.Tensor, own: torch.Tensor, lw: LayerWeights, patch: LayerPatch, m: float,
          dtype: torch.dtype) -> torch.Tensor:
    """DoRA in the hosts' order of operations (Forge 2.0.1 / Neo ``weight_decompose``, ComfyUI's): ΔW·(alpha/rank),
    W_c = W + ΔW, W_c *= dora_scale / (‖W_c‖ + eps), then ``W += strength·(W_c − W)`` (``W = W_c`` at strength 1) -
    so an A1111/kohya DoRA (one norm per input column) lands on the bits the host's own <lora> gives (our
    :func:`formats.apply_dora` rounds in another order: 1 ulp apart, measured in the real Forge 2.0.1).

    One deliberate difference: with one norm per *output row* (LyCORIS ``wd_on_output``, PEFT) the hosts divide by
    the norm of the original W, not of W + ΔW (ComfyUI's ``weight_decompose``; Forge 2.0.1 and Neo copy it; an open
    ComfyUI pull request, Comfy-Org/ComfyUI#15458, fixes it there). That is not the DoRA of the paper, PEFT or
    LyCORIS, nor what ``lora bake`` and the A1111 path compute, so the norm here is of W + ΔW on both axes."""
    t = {k: v.to(device=weight.device, dtype=dtype) for k, v in lw.t.items()}
    w = own.to(dtype)
    dw, _ = lw.module.delta(t, w, patch.dyn)
    if tuple(dw.shape) != tuple(w.shape):
        dw = dw.reshape(w.shape)
    dw *= lw.effective_scale()
    calc = w + dw
    ds = lw.dora_scale.to(device=weight.device, dtype=dtype)
    norm = formats.dora_norm(calc, formats.dora_on_out(ds, w.shape)) + torch.finfo(dtype).eps
    calc *= ds.reshape(norm.shape) / norm
    if m != 1.0:
        calc -= w
        new = w + m * calc
    else:
        new = calc
    weight.copy_((_swap(new) if patch.swap else new).to(weight.dtype))
    return weight


def kohya_names_by_target(arch: str) -> Dict[Tuple[str, Optional[int]], List[str]]:
    """(checkpoint module, qkv index) -> the kohya module names a LoRA loader knows it by (text encoders: HF CLIP
    paths; UNet: ldm and diffusers paths)."""
    out: Dict[Tuple[str, Optional[int]], List[str]] = {}
    for name, t in lora_names(base_arch(arch)).items():
        out.setdefault((t.module, t.qkv_index), []).append(name)
    for name, t in keymaps.kohya_lora_names(base_arch(arch)).items():
        lst = out.setdefault((t.module, t.qkv_index), [])
        if name not in lst:
            lst.append(name)
    return out


def patcher_key(layer: BoundLayer, arch: str, key_map: Mapping[str, str],
                names: Optional[Mapping[Tuple[str, Optional[int]], List[str]]] = None) -> Optional[str]:
    """The patcher parameter (``diffusion_model.input_blocks.1.1.proj_in.weight``,
    ``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``) a layer lands on, looked up in the
    host's ``key_map`` (kohya name -> parameter, as the host's own LoRA loader builds it); None when the host has no
    such parameter."""
    t = layer.target
    if t.component == "unet" and t.module.startswith(keymaps.UNET_PREFIX) and t.qkv_index is None:
        local = t.module[len(keymaps.UNET_PREFIX):]
        k = key_map.get("lora_unet_" + local.replace(".", "_"))
        if k is not None:
            return k
    if names is None:
        names = kohya_names_by_target(arch)
    for name in names.get((t.module, t.qkv_index), ()):
        k = key_map.get(name)
        if k is not None:
            return k
    return None


#: where the patchers of Forge / Forge Neo hold each component of a Flux.1 model
FLUX_PREFIXES = {"transformer": "diffusion_model.", "text_encoder": "clip_l.transformer.",
                 "text_encoder_2": "t5xxl.transformer."}


def flux_patcher_key(layer: BoundLayer, param_shape: Callable[[str], Optional[Tuple[int, ...]]]):
    """The patch key of a Flux layer: the parameter name (``diffusion_model.double_blocks.0.img_attn.qkv.weight``)
    or, for a slice of a fused weight, ``(name, (0, first row, rows))``; None when the model has no such parameter
    (a T5 layer where the host loaded no T5) or the factors do not fit it (listed as unmatched by the caller)."""
    t = layer.target
    prefix = FLUX_PREFIXES.get(t.component)
    if prefix is None:
        return None
    key = prefix + t.weight_key
    shape = param_shape(key)
    if shape is None:
        return None
    shape = tuple(shape)
    rows = t.row_slice(shape)
    target_shape = shape if rows is None else (rows.stop - rows.start, *shape[1:])
    if rows is not None and rows.stop > shape[0]:
        return None
    try:
        formats.check_layer(layer.weights, target_shape)
    except ValueError:
        return None
    return key if rows is None else (key, (0, rows.start, rows.stop - rows.start))


def _bias_key(key):
    """The bias patch key beside a weight patch key (same offset: a fused bias has the weight's rows)."""
    if isinstance(key, tuple):
        return (key[0][:-len(".weight")] + ".bias", key[1])
    return key[:-len(".weight")] + ".bias"


def _name(key) -> str:
    return key[0] if isinstance(key, tuple) else key


@dataclass
class PatchSet:
    """The patches of one network: ``unet`` / ``clip`` = {patcher key: (PATCH_TYPE, LayerPatch)}; ``identifier`` is
    unique for everything that changes the weights (file, mtime, multipliers, dyn, block weights), because the
    patcher re-merges only when the identifiers of its patch sets change."""

    identifier: str
    unet: Dict[str, tuple]
    clip: Dict[str, tuple]
    unmatched: List[str]
    #: why none of the network is applied, when that is known (a Flux control LoRA: :data:`CONTROL_NOT_APPLIED`)
    refused: Optional[str] = None


def build_patches(a: ActiveNetwork, arch: str, unet_keys: Mapping[str, str], clip_keys: Mapping[str, str],
                  param_shape: Callable[[str], Optional[Tuple[int, ...]]]) -> PatchSet:
    """Patches of one active network for the UNet and CLIP patchers. Layers whose multiplier is 0 are left out;
    layers the host's models do not have are listed in ``unmatched`` (module names of the file). ``param_shape(key)``
    gives the shape of a patcher parameter (None if there is none): bias deltas go to the module's ``.bias``.
    Flux.1: keys from the parameter names (:func:`flux_patcher_key`; the key maps are not needed), with offsets
    into fused weights."""
    flux = is_flux(arch)
    names = None if flux else kohya_names_by_target(arch)
    unet: Dict[object, tuple] = {}
    clip: Dict[object, tuple] = {}
    unmatched: List[str] = []
    n = a.network
    bw = "" if a.block_weights is None else ",".join(f"{k}={v:g}" for k, v in sorted(a.block_weights.items()))
    ident = (f"sdtoolkit:{n.path}:{n.mtime}:te={a.te:g}:unet={a.unet:g}:dyn={a.dyn}:lbw={bw}")
    control = flux_control_reason(n.layers, param_shape) if flux else None
    if control is not None:   # nothing of it: its norms without its img_in would only spoil the image
        return PatchSet(ident, {}, {}, [f"{layer.weights.name} ({control})" for layer in n.layers], control)
    for layer in a.network.layers:
        m = a.multiplier(layer)
        is_te = layer.component.startswith("text_encoder")
        if flux:
            key = flux_patcher_key(layer, param_shape)
        else:
            key = patcher_key(layer, arch, clip_keys if is_te else unet_keys, names)
        if key is None:
            unmatched.append(layer.weights.name)
            continue
        if m == 0.0:
            continue
        dest = clip if is_te else unet
        swap = bool(flux and layer.target.swap)
        if key in dest:   # two modules of the file on one parameter (e.g. two spellings): both deltas, like Forge
            unmatched.append(f"{layer.weights.name} (a second module on {_name(key)}; not applied twice)")
            continue
        dest[key] = (PATCH_TYPE, LayerPatch(layer.weights, m, a.dyn, swap=swap))
        if _has_bias_delta(layer.weights) and _name(key).endswith(".weight"):
            bkey = _bias_key(key)
            wshape = param_shape(_name(key))
            if wshape is not None and param_shape(_name(bkey)) is not None:
                if isinstance(key, tuple):
                    wshape = (key[1][2], *tuple(wshape)[1:])
                dest[bkey] = (PATCH_TYPE, LayerPatch(layer.weights, m, a.dyn, tuple(wshape), swap=swap))
    return PatchSet(ident, unet, clip, unmatched)


#: why a Flux control LoRA is not applied at generation
CONTROL_NOT_APPLIED = ("a Flux control LoRA (BFL Canny/Depth: it widens img_in to take a control image and sets the "
                       "qk-norms): the host's sampler does not feed it a control image, so it is not applied at "
                       "generation; bake it into a Flux dev checkpoint with `lora bake` and load that as a "
                       "Canny/Depth model where the host supports one")


def flux_control_reason(layers, param_shape: Callable[[str], Optional[Tuple[int, ...]]]) -> Optional[str]:
    """:data:`CONTROL_NOT_APPLIED` when ``layers`` are a Flux control LoRA (a ``set`` layer, or an ``img_in`` LoRA
    wider than the model's ``img_in``); None otherwise."""
    for layer in layers:
        if layer.weights.kind == "set":
            return CONTROL_NOT_APPLIED
        if layer.target.component == "transformer" and layer.target.module == "img_in":
            down = layer.weights.t.get("lora_down.weight")
            shape = param_shape(FLUX_PREFIXES["transformer"] + "img_in.weight")
            if down is not None and shape is not None and down.dim() == 2 and down.shape[1] > tuple(shape)[1]:
                return CONTROL_NOT_APPLIED
    return None


def _has_bias_delta(lw: LayerWeights) -> bool:
    return formats.has_bias_delta(lw)


def unavailable_options(a: ActiveNetwork) -> List[str]:
    """The options of a request a patcher cannot carry (reported to the user, never silently dropped)."""
    out = []
    if a.start is not None:
        out.append(f"start={a.start}")
    if a.stop is not None:
        out.append(f"stop={a.stop}")
    return out


# ------------------------------------------------------------------ the two patcher shapes (Forge 2.0.x, Forge Neo)
def key_map_of(fn: Callable, model) -> Dict[str, str]:
    """kohya name -> parameter from the host's key-map function ``fn(model, key_map)``: Forge 2.0.x returns the map;
    Forge Neo's (ComfyUI's) ``model_lora_keys_clip`` returns ``(state-dict keys, map)``; both fill the dict given."""
    given: Dict[str, str] = {}
    out = fn(model, given)
    if isinstance(out, tuple):
        out = out[-1]
    return out if isinstance(out, dict) else given


def takes_filename(patcher) -> bool:
    """Whether the patcher's ``add_patches`` takes ``filename=`` (Forge's own patcher: one patch set per file, kept in
    ``lora_patches`` under ``(filename, strength_patch, strength_model, online_mode)``) or not (ComfyUI's
    ModelPatcher, as Forge Neo now has: ``add_patches(patches, strength_patch, strength_model)`` appends per key)."""
    import inspect

    try:
        return "filename" in inspect.signature(patcher.add_patches).parameters
    except (TypeError, ValueError):
        return False


def _payload(value) -> Optional[LayerPatch]:
    """Our LayerPatch inside a patch value (an adapter holding ``.patch``, or a ``(PATCH_TYPE, payload)`` tuple)."""
    patch = getattr(value, "patch", None)
    if isinstance(patch, LayerPatch):
        return patch
    if isinstance(value, tuple) and len(value) == 2 and value[0] == PATCH_TYPE:
        return value[1]
    return None


def carries(patcher, ps: PatchSet, which: str, named: bool) -> bool:
    """Whether ``patcher`` already holds this patch set: by identifier where sets are named, else by finding the
    set's own payload among the patches of its first parameter."""
    if named:
        return any(k[0] == ps.identifier for k in getattr(patcher, "lora_patches", {}))
    patches = getattr(ps, which)
    key = next(iter(patches))
    mine = patches[key][1]
    return any(_payload(entry[1]) is mine for entry in getattr(patcher, "patches", {}).get(_name(key), ()))


def add_patch_sets(obj, patcher, sets: Sequence[PatchSet], which: str, wrap: Callable,
                   online: Callable[[], bool] = lambda: False):
    """A clone of ``obj`` (the host's UNet patcher, or its CLIP object whose ``.patcher`` is ``patcher``) with the
    ``which`` ("unet"/"clip") patches of every set it does not carry yet, each value made by ``wrap(LayerPatch)``;
    None when there is nothing to add (adding twice would double the delta). ``online()`` (Forge's on-the-fly mode
    for quantized weights) is asked only where ``add_patches`` takes it."""
    named = takes_filename(patcher)
    todo = [ps for ps in sets if getattr(ps, which) and not carries(patcher, ps, which, named)]
    if not todo:
        return None
    on = bool(online()) if named else False
    new = obj.clone()
    for ps in todo:
        patches = {k: wrap(v[1]) for k, v in getattr(ps, which).items()}
        if named:
            new.add_patches(filename=ps.identifier, patches=patches, strength_patch=1.0, online_mode=on)
        else:
            new.add_patches(patches, 1.0)
    return new


__all__ = ["FLUX_PREFIXES", "PATCH_TYPE", "LayerPatch", "PatchSet", "add_patch_sets", "apply_patch", "build_patches",
           "CONTROL_NOT_APPLIED", "flux_control_reason", "carries", "flux_patcher_key", "key_map_of", "patcher_key", "takes_filename", "unavailable_options"]
