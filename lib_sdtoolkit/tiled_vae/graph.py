"""The SD VAE encoder/decoder as a flat list of ops that a tile executor can run region by region.

Both the ldm modules the WebUI runs (``ldm.modules.diffusionmodules.model.Encoder``/``Decoder``) and diffusers'
``AutoencoderKL.encoder``/``.decoder`` flatten to the same op kinds; the ops call the real sub-modules
(convolutions are called as modules so that anything patched onto them -- e.g. the WebUI's Lora hooks -- still
applies). GroupNorms are *not* called: the executor applies them with statistics gathered over all tiles.

Op kinds
  conv     3x3 / 1x1 stride-1 "same" convolution (``pad`` = its padding)
  gn       GroupNorm (``silu``: followed by SiLU, fused on apply)
  silu / tanh
  push     save the current activation as the next residual
  add      ``h = (shortcut(residual) + h) / div``
  up       nearest x2 (the upsample's conv follows as a ``conv``)
  down     zero-pad right/bottom by 1, then a 3x3 stride-2 convolution (ldm ``Downsample`` / diffusers
           ``Downsample2D(padding=0)``)
  attn     the whole mid-block attention block (norm, q/k/v, softmax, proj, residual): global, run on the
           full tensor by the executor
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn

from ..errors import ArchitectureError


@dataclass
class AttnParams:
    norm: nn.Module           # GroupNorm
    wq: torch.Tensor          # [C, C] (out, in)
    bq: Optional[torch.Tensor]
    wk: torch.Tensor
    bk: Optional[torch.Tensor]
    wv: torch.Tensor
    bv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]
    heads: int
    scale: float
    rescale: float = 1.0      # diffusers rescale_output_factor
    residual: bool = True


@dataclass
class Op:
    kind: str
    module: Any = None
    pad: int = 0
    silu: bool = False
    div: float = 1.0
    attn: Optional[AttnParams] = None
    name: str = ""

    @property
    def groups(self) -> int:
        return int(self.module.num_groups)


@dataclass
class Program:
    ops: List[Op]
    in_channels: int
    out_channels: int
    kind: str                 # "decoder" | "encoder"
    flavour: str              # "ldm" | "diffusers"
    module: nn.Module = field(repr=False, default=None)


def _conv(m: nn.Module, name: str) -> Op:
    if not isinstance(m, nn.Conv2d):
        raise ArchitectureError(f"{name}: expected a Conv2d, found {type(m).__name__}")
    k = m.kernel_size[0]
    if m.stride != (1, 1) or m.kernel_size[0] != m.kernel_size[1] or m.padding != (k // 2, k // 2) or k % 2 != 1 \
            or m.dilation != (1, 1) or m.groups != 1:
        raise ArchitectureError(f"{name}: only stride-1 'same' convolutions can be tiled "
                                f"(kernel {m.kernel_size}, stride {m.stride}, padding {m.padding})")
    return Op("conv", module=m, pad=k // 2, name=name)


def _gn(m: nn.Module, name: str, silu: bool) -> Op:
    if not isinstance(m, nn.GroupNorm):
        raise ArchitectureError(f"{name}: expected a GroupNorm, found {type(m).__name__}")
    return Op("gn", module=m, silu=silu, name=name)


def _down(m: nn.Module, name: str) -> Op:
    conv = getattr(m, "conv", None)
    if conv is None or not getattr(m, "with_conv", getattr(m, "use_conv", True)):
        raise ArchitectureError(f"{name}: average-pool downsampling is not supported")
    if getattr(m, "padding", 0) not in (0, None) or getattr(m, "norm", None) is not None:
        raise ArchitectureError(f"{name}: only the SD VAE's asymmetric-pad stride-2 downsample is supported")
    if conv.stride != (2, 2) or conv.kernel_size != (3, 3) or conv.padding != (0, 0):
        raise ArchitectureError(f"{name}: unexpected downsample convolution {conv}")
    return Op("down", module=conv, name=name)


def _ldm_resblock(blk: nn.Module, name: str) -> List[Op]:
    if getattr(blk, "temb_proj", None) is not None and getattr(blk, "temb_ch", 0):
        pass  # the VAE passes temb=None: temb_proj is never used
    ops = [Op("push", name=name), _gn(blk.norm1, name + ".norm1", True), _conv(blk.conv1, name + ".conv1"),
           _gn(blk.norm2, name + ".norm2", True), _conv(blk.conv2, name + ".conv2")]
    sc = None
    if blk.in_channels != blk.out_channels:
        sc = blk.conv_shortcut if getattr(blk, "use_conv_shortcut", False) else blk.nin_shortcut
    ops.append(Op("add", module=_conv(sc, name + ".shortcut").module if sc is not None else None,
                  pad=(sc.kernel_size[0] // 2 if sc is not None else 0), name=name + ".add"))
    return ops


def _diffusers_resblock(blk: nn.Module, name: str) -> List[Op]:
    if getattr(blk, "upsample", None) is not None or getattr(blk, "downsample", None) is not None:
        raise ArchitectureError(f"{name}: resnet blocks with built-in resampling are not supported")
    if getattr(blk, "time_emb_proj", None) is not None:
        raise ArchitectureError(f"{name}: time-embedding resnet blocks are not part of the SD VAE")
    act = getattr(blk, "nonlinearity", None)
    if act is not None and not isinstance(act, nn.SiLU):
        raise ArchitectureError(f"{name}: activation {type(act).__name__} is not SiLU")
    ops = [Op("push", name=name), _gn(blk.norm1, name + ".norm1", True), _conv(blk.conv1, name + ".conv1"),
           _gn(blk.norm2, name + ".norm2", True), _conv(blk.conv2, name + ".conv2")]
    sc = getattr(blk, "conv_shortcut", None)
    ops.append(Op("add", module=sc, pad=(sc.kernel_size[0] // 2 if sc is not None else 0),
                  div=float(getattr(blk, "output_scale_factor", 1.0) or 1.0), name=name + ".add"))
    return ops


def _mat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def _ldm_attn(a: nn.Module, name: str) -> Op:
    for n in ("norm", "q", "k", "v", "proj_out"):
        if not hasattr(a, n):
            raise ArchitectureError(f"{name}: attention block without '{n}' ({type(a).__name__})")
    c = a.q.weight.shape[0]
    p = AttnParams(a.norm, _mat(a.q.weight), a.q.bias, _mat(a.k.weight), a.k.bias, _mat(a.v.weight), a.v.bias,
                   _mat(a.proj_out.weight), a.proj_out.bias, heads=1, scale=float(c) ** -0.5)
    return Op("attn", attn=p, name=name)


def _diffusers_attn(a: nn.Module, name: str) -> Op:
    if getattr(a, "group_norm", None) is None or getattr(a, "spatial_norm", None) is not None:
        raise ArchitectureError(f"{name}: only group-norm self-attention is supported")
    o = a.to_out[0]
    p = AttnParams(a.group_norm, a.to_q.weight, a.to_q.bias, a.to_k.weight, a.to_k.bias, a.to_v.weight,
                   a.to_v.bias, o.weight, o.bias, heads=int(a.heads), scale=float(a.scale),
                   rescale=float(getattr(a, "rescale_output_factor", 1.0)),
                   residual=bool(getattr(a, "residual_connection", True)))
    return Op("attn", attn=p, name=name)


def _is_diffusers(m: nn.Module) -> bool:
    return hasattr(m, "conv_norm_out") or hasattr(m, "up_blocks") or hasattr(m, "down_blocks")


def build_program(module: nn.Module) -> Program:
    """Flatten an ldm/diffusers VAE ``Encoder`` or ``Decoder`` into a :class:`Program`."""
    if _is_diffusers(module):
        return _diffusers_program(module)
    if hasattr(module, "up") and hasattr(module, "mid"):
        return _ldm_decoder(module)
    if hasattr(module, "down") and hasattr(module, "mid"):
        return _ldm_encoder(module)
    raise ArchitectureError(f"{type(module).__name__} is not an SD VAE encoder or decoder")


def _ldm_mid(mod: nn.Module, prefix: str) -> List[Op]:
    ops = _ldm_resblock(mod.mid.block_1, prefix + "mid.block_1")
    if isinstance(mod.mid.attn_1, nn.Identity):
        pass
    else:
        ops.append(_ldm_attn(mod.mid.attn_1, prefix + "mid.attn_1"))
    ops += _ldm_resblock(mod.mid.block_2, prefix + "mid.block_2")
    return ops


def _ldm_decoder(d: nn.Module) -> Program:
    ops: List[Op] = [_conv(d.conv_in, "decoder.conv_in")]
    ops += _ldm_mid(d, "decoder.")
    for lvl in reversed(range(d.num_resolutions)):
        up = d.up[lvl]
        for i in range(d.num_res_blocks + 1):
            ops += _ldm_resblock(up.block[i], f"decoder.up.{lvl}.block.{i}")
            if len(up.attn) > 0:
                ops.append(_ldm_attn(up.attn[i], f"decoder.up.{lvl}.attn.{i}"))
        if lvl != 0:
            if not up.upsample.with_conv:
                ops.append(Op("up", name=f"decoder.up.{lvl}.upsample"))
            else:
                ops += [Op("up", name=f"decoder.up.{lvl}.upsample"),
                        _conv(up.upsample.conv, f"decoder.up.{lvl}.upsample.conv")]
    if getattr(d, "give_pre_end", False):
        raise ArchitectureError("decoder with give_pre_end=True is not supported")
    ops += [_gn(d.norm_out, "decoder.norm_out", True), _conv(d.conv_out, "decoder.conv_out")]
    if getattr(d, "tanh_out", False):
        ops.append(Op("tanh", name="decoder.tanh"))
    return Program(ops, d.conv_in.in_channels, d.conv_out.out_channels, "decoder", "ldm", d)


def _ldm_encoder(e: nn.Module) -> Program:
    ops: List[Op] = [_conv(e.conv_in, "encoder.conv_in")]
    for lvl in range(e.num_resolutions):
        dn = e.down[lvl]
        for i in range(e.num_res_blocks):
            ops += _ldm_resblock(dn.block[i], f"encoder.down.{lvl}.block.{i}")
            if len(dn.attn) > 0:
                ops.append(_ldm_attn(dn.attn[i], f"encoder.down.{lvl}.attn.{i}"))
        if lvl != e.num_resolutions - 1:
            ops.append(_down(dn.downsample, f"encoder.down.{lvl}.downsample"))
    ops += _ldm_mid(e, "encoder.")
    ops += [_gn(e.norm_out, "encoder.norm_out", True), _conv(e.conv_out, "encoder.conv_out")]
    return Program(ops, e.conv_in.in_channels, e.conv_out.out_channels, "encoder", "ldm", e)


def _diffusers_mid(mb: nn.Module, prefix: str) -> List[Op]:
    if mb is None:
        return []
    ops = _diffusers_resblock(mb.resnets[0], prefix + "mid_block.resnets.0")
    attns = list(getattr(mb, "attentions", []))
    for j, res in enumerate(mb.resnets[1:]):
        a = attns[j] if j < len(attns) else None
        if a is not None:
            ops.append(_diffusers_attn(a, f"{prefix}mid_block.attentions.{j}"))
        ops += _diffusers_resblock(res, f"{prefix}mid_block.resnets.{j + 1}")
    return ops


def _diffusers_act(m: nn.Module, name: str) -> None:
    if not isinstance(m, nn.SiLU):
        raise ArchitectureError(f"{name}: activation {type(m).__name__} is not SiLU")


def _diffusers_program(m: nn.Module) -> Program:
    if hasattr(m, "up_blocks"):
        ops: List[Op] = [_conv(m.conv_in, "decoder.conv_in")]
        ops += _diffusers_mid(m.mid_block, "decoder.")
        for i, ub in enumerate(m.up_blocks):
            if getattr(ub, "attentions", None):
                raise ArchitectureError(f"decoder.up_blocks.{i}: attention up blocks are not supported")
            for j, r in enumerate(ub.resnets):
                ops += _diffusers_resblock(r, f"decoder.up_blocks.{i}.resnets.{j}")
            if getattr(ub, "upsamplers", None):
                u = ub.upsamplers[0]
                if getattr(u, "use_conv_transpose", False) or getattr(u, "norm", None) is not None \
                        or getattr(u, "interpolate", True) is False:
                    raise ArchitectureError(f"decoder.up_blocks.{i}.upsamplers.0: unsupported upsampler")
                ops.append(Op("up", name=f"decoder.up_blocks.{i}.upsamplers.0"))
                conv = getattr(u, "conv", None)
                if conv is not None:
                    ops.append(_conv(conv, f"decoder.up_blocks.{i}.upsamplers.0.conv"))
        if getattr(m.conv_norm_out, "__class__", None) is not None and not isinstance(m.conv_norm_out, nn.GroupNorm):
            raise ArchitectureError("decoder.conv_norm_out: spatial norm decoders are not supported")
        _diffusers_act(m.conv_act, "decoder.conv_act")
        ops += [_gn(m.conv_norm_out, "decoder.conv_norm_out", True), _conv(m.conv_out, "decoder.conv_out")]
        return Program(ops, m.conv_in.in_channels, m.conv_out.out_channels, "decoder", "diffusers", m)
    ops = [_conv(m.conv_in, "encoder.conv_in")]
    for i, db in enumerate(m.down_blocks):
        if getattr(db, "attentions", None):
            raise ArchitectureError(f"encoder.down_blocks.{i}: attention down blocks are not supported")
        for j, r in enumerate(db.resnets):
            ops += _diffusers_resblock(r, f"encoder.down_blocks.{i}.resnets.{j}")
        if getattr(db, "downsamplers", None):
            ops.append(_down(db.downsamplers[0], f"encoder.down_blocks.{i}.downsamplers.0"))
    ops += _diffusers_mid(m.mid_block, "encoder.")
    _diffusers_act(m.conv_act, "encoder.conv_act")
    ops += [_gn(m.conv_norm_out, "encoder.conv_norm_out", True), _conv(m.conv_out, "encoder.conv_out")]
    return Program(ops, m.conv_in.in_channels, m.conv_out.out_channels, "encoder", "diffusers", m)


def param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
