"""Network formats: which parts a module has, and its ΔW in fp32.

Each network type is one small module (``lora``, ``loha``, ``lokr``, ``ia3``, ``full``, ``norm``,
``oft``) exposing
``KIND``, ``accepts(parts)``, ``rank(t)``, ``scaled`` (whether alpha/rank applies) and ``delta(t, weight, dyn)``
returning the unscaled ΔW (and bias delta) in fp32, shaped like the target weight. :func:`compute_delta` adds what is
common to all types, in the WebUI's order (A1111 ``NetworkModule.finalize_updown``):

1. ``ΔW *= scale`` where scale = the ``scale`` key if present, else alpha/rank if both are known, else 1
   (alpha 0 or missing = rank, as kohya trains it);
2. DoRA when ``dora_scale`` is present: W'' = dora_scale · (W + ΔW)/‖W + ΔW‖ and ΔW = W'' − W, the norm taken per
   output row or per input column as detected from the shape of ``dora_scale`` (a flat one is PEFT's per-output
   magnitude; ambiguous shapes are refused);
3. the caller multiplies by the user's multiplier (te/unet weight x block weight).

Module types are tried in the WebUI's order; the first that accepts the module's part names wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from ...errors import ModelFileError
from . import full, ia3, loha, lokr, lora, norm, oft, setw

#: tried in this order (A1111 networks.module_types order; ``set`` last: no WebUI type has its part)
TYPES = (lora, loha, ia3, lokr, full, norm, oft, setw)
#: parts every type may carry besides its own
COMMON_PARTS = {"alpha", "scale", "dora_scale", "bias"}


class FormatError(ModelFileError):
    """A network module whose factors are inconsistent (rank mismatch, wrong shape, NaN/inf)."""


@dataclass
class LayerWeights:
    """One network module of a file: its name in the file, its type and its tensors (part name -> tensor)."""

    name: str
    kind: str
    t: Dict[str, torch.Tensor]
    alpha: Optional[float] = None
    scale: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None

    @property
    def module(self):
        return _BY_KIND[self.kind]

    @property
    def rank(self) -> Optional[int]:
        return self.module.rank(self.t)

    def effective_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        if not self.module.scaled(self.t):
            return 1.0
        r = self.rank
        if r is None:
            return 1.0
        if self.alpha is None or self.alpha == 0:
            return 1.0
        return float(self.alpha) / r

    def nbytes(self) -> int:
        n = sum(v.numel() * v.element_size() for v in self.t.values())
        if self.dora_scale is not None:
            n += self.dora_scale.numel() * self.dora_scale.element_size()
        return n


_BY_KIND = {m.KIND: m for m in TYPES}


def classify(parts: Set[str]) -> Optional[str]:
    """The type of a module with these part names (``lora_up.weight``, ``alpha``...), or None."""
    own = set(parts) - COMMON_PARTS
    for m in TYPES:
        if m.accepts(own):
            return m.KIND
    return None


def make_layer(name: str, tensors: Dict[str, torch.Tensor], path: Optional[str] = None) -> LayerWeights:
    kind = classify(set(tensors))
    if kind is None:
        raise FormatError(f"unknown network module type with parts {sorted(tensors)}", path, name)
    # OFT's alpha is its constraint, part of its formula: it stays among its tensors
    t = {k: v for k, v in tensors.items()
         if k not in ("alpha", "scale", "dora_scale") or (k == "alpha" and kind == "oft")}
    alpha = tensors.get("alpha")
    scale = tensors.get("scale")
    return LayerWeights(name, kind, t,
                        alpha=float(alpha.float().reshape(-1)[0]) if alpha is not None and alpha.numel() else None,
                        scale=float(scale.float().reshape(-1)[0]) if scale is not None and scale.numel() else None,
                        dora_scale=tensors.get("dora_scale"))


def effective_multiplier(layer: LayerWeights, m: float) -> float:
    """The multiplier a layer's ΔW is applied with: ``m``, except for a ``set`` layer, whose value is set whatever
    the strength (as ComfyUI / Forge Neo and diffusers do), so 1 unless ``m`` is 0."""
    if layer.kind == "set":
        return 0.0 if m == 0 else 1.0
    return m


#: the parts that hold a layer's Δbias (one per format), in the order they are looked for
BIAS_PARTS = ("diff_b", "b_norm", "lora_up.bias", "bias")


def bias_delta(layer: LayerWeights) -> Optional[torch.Tensor]:
    """The layer's Δbias in fp32 (flat), scaled as :func:`compute_delta` scales it, not multiplied by the user's
    weight; None without one. Every format's Δbias is its own tensor (``diff_b``, ``b_norm``, ``bias``,
    ``lora_up.bias``), independent of W."""
    t = layer.t
    for part in BIAS_PARTS:
        if part in t:
            d = t[part].float().reshape(-1)
            if part == "lora_up.bias":
                s = layer.effective_scale()
                if s != 1.0:
                    d = d * s
            return d
    return None


def has_bias_delta(layer: LayerWeights) -> bool:
    return any(p in layer.t for p in BIAS_PARTS)


def dora_on_out(dora_scale: torch.Tensor, shape: Sequence[int]) -> bool:
    """True when ``dora_scale`` holds one norm per output row (LyCORIS >= 3.2, PEFT), False for one per input
    column (A1111 / older LyCORIS). A flat (1-D) one is PEFT's per-output magnitude wherever its length is the number
    of rows (square weights included: every q/k/v slice of Flux). Raises ValueError when its shape fits both or
    neither."""
    out_dim, in_dim = int(shape[0]), int(shape[1]) if len(shape) > 1 else 1
    s = tuple(dora_scale.shape)
    nontrivial = [i for i, d in enumerate(s) if d != 1]
    if len(s) >= 2 and len(nontrivial) <= 1:
        if nontrivial == [0] and s[0] == out_dim:
            return True
        if nontrivial == [1] and s[1] == in_dim:
            return False
        if not nontrivial and out_dim == 1 and in_dim != 1:
            return True
        if not nontrivial and in_dim == 1 and out_dim != 1:
            return False
    if len(s) == 1:   # only PEFT writes a flat magnitude (``lora_magnitude_vector``): one norm per output row,
        if s[0] == out_dim:   # also on a square weight (the hosts' weight_decompose reads it so: shape[0] == rows)
            return True
        if s[0] == in_dim:
            return False
    raise ValueError(f"dora_scale of shape {list(s)} does not tell per-output from per-input for a weight of "
                     f"shape {list(shape)}")


def dora_norm(merged: torch.Tensor, on_out: bool) -> torch.Tensor:
    """‖W+ΔW‖ per output row (``on_out``) or per input column, shaped to broadcast against ``merged``."""
    if on_out:
        return merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    return (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            .reshape(1, merged.shape[1], *[1] * (merged.dim() - 2)))


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, on_out: bool) -> torch.Tensor:
    """ΔW after weight decomposition: dora_scale · (W+ΔW)/‖W+ΔW‖ − W (fp32)."""
    merged = weight + delta
    norm_ = dora_norm(merged, on_out)
    return dora_scale.reshape(norm_.shape).to(merged) * merged / (norm_ + torch.finfo(torch.float32).eps) - weight


def compute_delta(layer: LayerWeights, weight: torch.Tensor, dyn: Optional[int] = None,
                  device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(ΔW, Δbias or None) of one module in fp32, scaled by alpha/rank and DoRA-decomposed, *not* multiplied by the
    user's weight. ``weight`` is the target's original weight (any dtype; its shape is the shape of ΔW)."""
    dev = device if device is not None else weight.device
    t = {k: v.to(device=dev, dtype=torch.float32) for k, v in layer.t.items()}
    w = weight.to(device=dev, dtype=torch.float32)
    dw, db = layer.module.delta(t, w, dyn)
    if tuple(dw.shape) != tuple(w.shape):
        if dw.numel() != w.numel():
            raise ValueError(f"{layer.kind} ΔW has shape {list(dw.shape)}, the target weight {list(w.shape)}")
        dw = dw.reshape(w.shape)
    s = layer.effective_scale()
    if s != 1.0:
        dw = dw * s
        if db is not None and layer.kind not in ("full", "norm"):
            db = db * s
    if layer.dora_scale is not None:
        ds = layer.dora_scale.to(device=dev, dtype=torch.float32)
        dw = apply_dora(w, dw, ds, dora_on_out(ds, w.shape))
    if "bias" in t and db is None and layer.kind not in ("full", "norm", "ia3"):
        db = t["bias"].reshape(-1)
    return dw, db


def unscaled_delta(layer: LayerWeights, weight: torch.Tensor, dyn: Optional[int] = None,
                   device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
                   ) -> Optional[Tuple[torch.Tensor, float]]:
    """``(ΔW before its alpha/rank scale, that scale)`` computed in ``dtype`` for a module without DoRA; None with
    DoRA (use :func:`compute_delta`). Lets a caller multiply once by ``scale x strength``, the order the hosts' LoRA
    patchers use (``weight += (strength * alpha) * diff``, in their computation dtype: fp32 when merging, the
    model's compute dtype for Forge's on-the-fly LoRA), so a LoKr/LoHa lands on the same bits as the host's own
    loader."""
    if layer.dora_scale is not None:
        return None
    dev = device if device is not None else weight.device
    t = {k: v.to(device=dev, dtype=dtype) for k, v in layer.t.items()}
    dw, _ = layer.module.delta(t, weight.to(device=dev, dtype=dtype), dyn)
    if tuple(dw.shape) != tuple(weight.shape):
        if dw.numel() != weight.numel():
            raise ValueError(f"{layer.kind} ΔW has shape {list(dw.shape)}, the target weight {list(weight.shape)}")
        dw = dw.reshape(weight.shape)
    return dw, layer.effective_scale()


def lowrank_factors(layer: LayerWeights, dyn: Optional[int] = None, device: Optional[torch.device] = None
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
    """``(up, down, scale)`` with ΔW = scale · up @ down (up ``(out, r)``, down ``(r, in·k·k)``, fp32 on ``device``)
    for a plain LoRA/LoCon module (no CP ``lora_mid``, no DoRA, no bias), so callers can fuse the product into an
    ``addmm``; None for every other module (use :func:`compute_delta`)."""
    if layer.kind != "lora" or layer.dora_scale is not None or set(layer.t) != {"lora_up.weight", "lora_down.weight"}:
        return None
    up, down = layer.t["lora_up.weight"], layer.t["lora_down.weight"]
    if up.dim() < 2 or any(d != 1 for d in up.shape[2:]) or up.shape[1] != down.shape[0]:
        return None
    if dyn is not None and 0 < dyn < down.shape[0]:
        up, down = up[:, :dyn], down[:dyn]
    up = up.reshape(up.shape[0], up.shape[1]).to(device=device, dtype=torch.float32)
    down = down.reshape(down.shape[0], -1).to(device=device, dtype=torch.float32)
    return up, down, layer.effective_scale()


def check_layer(layer: LayerWeights, shape: Sequence[int], dyn: Optional[int] = None) -> None:
    """Dry run on the meta device: raises ValueError if the factors do not fit each other or ``shape``."""
    meta = LayerWeights(layer.name, layer.kind, {k: torch.empty(v.shape, device="meta") for k, v in layer.t.items()},
                        layer.alpha, layer.scale,
                        torch.empty(layer.dora_scale.shape, device="meta") if layer.dora_scale is not None else None)
    try:
        compute_delta(meta, torch.empty(tuple(shape), device="meta"), dyn)
    except (RuntimeError, ValueError, IndexError) as e:
        msg = str(e).splitlines()[0]
        raise ValueError(f"{layer.kind} factors {({k: list(v.shape) for k, v in layer.t.items()})} do not fit a "
                         f"weight of shape {list(shape)}: {msg}") from None


def nonfinite_parts(layer: LayerWeights) -> List[str]:
    # float8 has no isfinite kernel: checked upcast (LoRA factors are small)
    bad = [k for k, v in layer.t.items() if v.is_floating_point()
           and not bool(torch.isfinite(v.float() if v.element_size() == 1 else v).all())]
    if layer.dora_scale is not None and not bool(torch.isfinite(layer.dora_scale.float()).all()):
        bad.append("dora_scale")
    for nm, v in (("alpha", layer.alpha), ("scale", layer.scale)):
        if v is not None and not torch.isfinite(torch.tensor(v)):
            bad.append(nm)
    return bad


__all__ = ["TYPES", "LayerWeights", "FormatError", "classify", "make_layer", "compute_delta", "lowrank_factors", "unscaled_delta",
           "effective_multiplier", "bias_delta", "has_bias_delta",
           "check_layer",
           "apply_dora", "dora_on_out", "nonfinite_parts"]
