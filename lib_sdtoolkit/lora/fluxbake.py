"""Where a Flux LoRA layer lands in a Flux checkpoint of any layout, and the bake onto it.

A layer's target is a BFL module with an optional row range (:class:`~lib_sdtoolkit.arch.keymaps.LoraTarget`
``rows``/``swap``). :func:`placements` turns it into patches of the checkpoint's own keys, like ComfyUI's
model_patcher keeps a patch with an offset into a fused weight:

* BFL layout (bare, ``diffusion_model.``, ``model.diffusion_model.`` and the all-in-one files): one key, the
  target's rows of it;
* diffusers layout: the BFL module's pieces (``to_q``/``to_k``/``to_v`` of a ``qkv``, the four pieces of
  ``linear1``), each getting the rows of the layer's ΔW that fall into it; ``norm_out.linear`` gets the final
  modulation's halves swapped back;
* CLIP-L / T5 layers: ``text_encoders.clip_l.transformer.`` / ``text_encoders.t5xxl.transformer.`` in an all-in-one
  file; a file without a text encoder skips them (counted, not an error).

A placement is ``(key, key_rows, layer_rows, flip)``: ΔW[layer_rows] (halves swapped first when ``flip``) is added
to ``key``'s rows ``key_rows`` (None = all rows).

**Control LoRAs** (BFL's FLUX.1 Canny/Depth dev LoRAs; ComfyUI ``convert_lora_bfl_control``, diffusers'
``FluxControlPipeline.load_lora_weights``): ``lora_B.bias`` is a Δbias, the qk-norms' ``scale`` is *set* (the
``set`` type, whatever the multiplier unless 0), and ``img_in``'s LoRA takes more input channels than the checkpoint
(128 = the packed latent and the packed control image): ``img_in.weight`` is widened with zero columns before the
ΔW is added (:attr:`FluxPatches.widen`), as both hosts do, and the baked checkpoint is a Canny/Depth-style Flux.
Only ``img_in`` (diffusers ``x_embedder``) is widened: it is the one layer whose input is the latent's channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..arch import fluxmaps
from ..arch.keymaps import LoraTarget
from ..errors import ArchitectureError
from . import formats


@dataclass(frozen=True)
class Placement:
    key: str
    key_rows: Optional[Tuple[int, int]]
    layer_rows: Optional[Tuple[int, int]]
    flip: bool


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0] // 2
    return torch.cat([t[n:], t[:n]], dim=0)


def _te_key(prefixes: Mapping[str, str], shapes: Mapping[str, Any], comp: str, module: str) -> Optional[str]:
    p = prefixes.get(comp)
    if p is None:
        return None
    for k in (p + "transformer." + module + ".weight", p + module + ".weight"):
        if k in shapes:
            return k
    return None


def placements(target: LoraTarget, layout: str, prefixes: Mapping[str, str], shapes: Mapping[str, Any]
               ) -> Tuple[List[Placement], Optional[Tuple[int, ...]]]:
    """(placements, the shape of the layer's ΔW) of ``target`` in a Flux checkpoint (``layout`` and ``prefixes``
    as :func:`lib_sdtoolkit.arch.detect` reports them, ``shapes``: key -> shape). ([], None) when the checkpoint
    lacks that component (a text-encoder layer on a transformer-only file)."""
    if target.component != "transformer":
        k = _te_key(prefixes, shapes, target.component, target.module)
        if k is None:
            return [], None
        return [Placement(k, None, None, False)], tuple(shapes[k])
    p = prefixes.get("transformer", "")
    if layout == "diffusers" and target.param != "weight":   # a qk-norm: diffusers' ``norm_q.weight``...
        d = fluxmaps.norm_modules().get(target.module)
        if d is None or p + d + ".weight" not in shapes:
            raise KeyError(p + (d or target.module) + ".weight")
        return [Placement(p + d + ".weight", None, None, False)], tuple(shapes[p + d + ".weight"])
    if layout != "diffusers":
        k = p + target.module + "." + target.param
        if k not in shapes:
            raise KeyError(k)
        shape = tuple(shapes[k])
        rows = target.row_slice(shape)
        if rows is None:
            return [Placement(k, None, None, target.swap)], shape
        return [Placement(k, (rows.start, rows.stop), None, target.swap)], (rows.stop - rows.start, *shape[1:])
    pieces = fluxmaps.bfl_to_diffusers().get(target.module)
    if not pieces:
        raise KeyError(target.module)
    n_units = fluxmaps.units(target.module)
    if len(pieces) == 1 and pieces[0][1] is None:  # one module on both sides
        d, _, pswap = pieces[0]
        k = p + d + ".weight"
        if k not in shapes:
            raise KeyError(k)
        return [Placement(k, None, None, target.swap != pswap)], tuple(shapes[k])
    first = p + pieces[0][0] + ".weight"
    if first not in shapes:
        raise KeyError(first)
    h = int(tuple(shapes[first])[1])
    a, n = target.rows if target.rows is not None else (0, n_units)
    out = []
    for d, (b, m), _ in pieces:  # fused modules carry no swap
        lo, hi = max(a, b), min(a + n, b + m)
        if lo >= hi:
            continue
        k = p + d + ".weight"
        if k not in shapes:
            raise KeyError(k)
        key_rows = None if (lo, hi) == (b, b + m) else ((lo - b) * h, (hi - b) * h)
        layer_rows = None if (lo, hi) == (a, a + n) else ((lo - a) * h, (hi - a) * h)
        out.append(Placement(k, key_rows, layer_rows, False))
    return out, (n * h, h)


def _rows(t: torch.Tensor, r: Optional[Tuple[int, int]]) -> torch.Tensor:
    return t if r is None else t[r[0]:r[1]]


#: the BFL modules a control LoRA may widen (input channels); diffusers calls it ``x_embedder``
WIDENABLE = ("img_in",)


def _input_columns(weights: Any) -> Optional[int]:
    """The input width a LoRA layer's ΔW has (``lora_down``'s columns); None for other types."""
    d = weights.t.get("lora_down.weight")
    return int(d.shape[1]) if weights.kind == "lora" and d is not None and d.dim() == 2 else None


def widened(t: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """``t`` (rows, c) with zero columns appended up to ``shape`` (rows, c'), as ComfyUI's ``reshape_weight`` and
    diffusers' ``_maybe_expand_transformer_param_shape_or_error_`` widen ``img_in``."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    out[:, : t.shape[1]] = t
    return out


class FluxPatches:
    """The patches of several networks on one Flux checkpoint, computed lazily key by key.

    ``patches[key]`` lists (layer index, placement, multiplier); a layer's ΔW is computed on first use (from its
    target's current weight assembled from the placements) and dropped after its last placement is written, so a
    ``qkv`` LoRA spread over ``to_q``/``to_k``/``to_v`` is computed once."""

    def __init__(self, layers: List[Tuple[Any, float]], layout: str, prefixes: Mapping[str, str],
                 shapes: Mapping[str, Any], path: Any, files: Optional[List[Any]] = None) -> None:
        """``path``: the checkpoint; ``files``: the LoRA file of each layer, named by a format error (else
        ``path``)."""
        self.layers = layers
        self.patches: Dict[str, List[Tuple[int, Placement, float]]] = {}
        self.places: List[List[Placement]] = []
        self.skipped = 0
        #: checkpoint key -> the wider shape a control LoRA gives it (``img_in.weight``: more input channels)
        self.widen: Dict[str, Tuple[int, ...]] = {}
        self._left: Dict[int, int] = {}
        self._cache: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        for i, (bound, m) in enumerate(layers):
            try:
                pl, shape = placements(bound.target, layout, prefixes, shapes)
            except KeyError as e:
                raise ArchitectureError(f"the checkpoint has no layer {e.args[0]}; not applied", path,
                                        bound.weights.name) from None
            self.places.append(pl)
            if not pl:
                self.skipped += 1
                continue
            src = files[i] if files else path
            shape = self._widen(bound, pl, shape, src)
            try:
                formats.check_layer(bound.weights, shape)
                if bound.weights.dora_scale is not None:
                    formats.dora_on_out(bound.weights.dora_scale, shape)
            except ValueError as e:
                raise formats.FormatError(f"{e}; the network is not applied", src, bound.weights.name) from None
            has_bias = formats.has_bias_delta(bound.weights)
            self._left[i] = len(pl) * (2 if has_bias else 1)
            for p in pl:
                self.patches.setdefault(p.key, []).append((i, p, m))
                bk = p.key[: -len(".weight")] + ".bias"
                if has_bias and bk in shapes:
                    self.patches.setdefault(bk, []).append((i, p, m))
                elif has_bias:
                    self._left[i] -= 1

    def _widen(self, bound: Any, pl: List[Placement], shape: Tuple[int, ...], path: Any) -> Tuple[int, ...]:
        """The shape the layer's ΔW gets: ``shape``, or ``img_in``'s widened to the LoRA's input channels."""
        cols = _input_columns(bound.weights)
        if (bound.target.component != "transformer" or bound.target.module not in WIDENABLE or cols is None
                or len(shape) != 2 or cols <= shape[1] or len(pl) != 1 or pl[0].key_rows is not None):
            return shape
        new = (shape[0], cols)
        had = self.widen.get(pl[0].key)
        if had is not None and had != new:
            raise formats.FormatError(f"this control LoRA widens {pl[0].key} to {cols} input channels, another one "
                                      f"given with it to {had[1]}; the network is not applied", path,
                                      bound.weights.name)
        self.widen[pl[0].key] = new
        return new

    def _get(self, key: str, reader: Any) -> torch.Tensor:
        t = reader.get(key)
        return widened(t, self.widen[key]) if key in self.widen else t

    def _weight(self, i: int, reader: Any) -> torch.Tensor:
        parts = []
        for p in sorted(self.places[i], key=lambda q: q.layer_rows[0] if q.layer_rows else 0):
            w = _rows(self._get(p.key, reader), p.key_rows).float()
            parts.append(swap_halves(w) if p.flip else w)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def delta(self, i: int, reader: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        d = self._cache.get(i)
        if d is None:
            d = formats.compute_delta(self.layers[i][0].weights, self._weight(i, reader))
            self._cache[i] = d
        return d

    def apply(self, key: str, t: torch.Tensor, reader: Any) -> Optional[torch.Tensor]:
        """``t`` (the checkpoint's tensor ``key``) with every patch of that key added, in fp32; None if none."""
        todo = self.patches.get(key)
        if not todo:
            return None
        is_bias = key.endswith(".bias")
        acc = (widened(t, self.widen[key]) if key in self.widen else t).float().clone()
        changed = key in self.widen
        for i, p, m in todo:
            lw = self.layers[i][0].weights
            m = formats.effective_multiplier(lw, m)
            if lw.kind == "set" and not is_bias:
                # a value, not a delta: set over whatever earlier networks did (the hosts' ``set`` patch)
                if m:   # a qk-norm: one key, all of it (no rows, no swap)
                    dst = _rows(acc, p.key_rows)
                    dst.copy_(lw.t["set_weight"].float().reshape(dst.shape))
                    changed = True
                d = None
            else:
                dw, db = self.delta(i, reader)
                d = db if is_bias else dw
            if d is not None:
                d = _rows(d, p.layer_rows)
                if p.flip:
                    d = swap_halves(d)
                _rows(acc, p.key_rows).add_(d.to(acc.device), alpha=m)
                changed = True
            self._left[i] -= 1
            if self._left[i] == 0:
                self._cache.pop(i, None)
        return acc if changed else None


__all__ = ["placements", "Placement", "FluxPatches", "swap_halves", "widened", "WIDENABLE"]
