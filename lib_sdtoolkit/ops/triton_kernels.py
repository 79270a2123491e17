"""Triton kernels behind :mod:`lib_sdtoolkit.ops.groupnorm` (imported only where CUDA and Triton exist).

* ``_gn_stats_kernel``: partial GroupNorm statistics of a tile's core region. Grid ``(B*G, SPLIT)``: each program
  takes a slice of the group's (channel, row) lines, and writes ``count, mean, M2`` of its slice in float32
  (two passes over its slice: mean, then squared deviations, so fp16 inputs with a large mean lose nothing).
  The ``SPLIT`` partials are merged with Chan's formula in torch (tiny tensors).
* ``_gn_apply_kernel``: ``y = x * scale[b, c] + shift[b, c]`` with an optional SiLU, one read and one write.
* ``_write_tile_kernel``: strided copy of a tile's core into the output (with the dtype cast fused).

All arithmetic is float32; outputs take the input's dtype. ``probe()`` runs each kernel once on a tiny tensor
so a broken Triton install is found before it matters (the dispatcher then falls back to PyTorch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Region = Tuple[int, int, int, int]


@triton.jit
def _gn_stats_kernel(x_ptr, out_ptr, C, G, CPG, y0, x0, RH, RW,
                     s_b, s_c, s_h, s_w, LINES_PER_PROG, SPLIT,
                     BLOCK: tl.constexpr):
    bg = tl.program_id(0)
    part = tl.program_id(1)
    b = bg // G
    g = bg % G
    n_lines = CPG * RH
    line_start = part * LINES_PER_PROG
    line_end = tl.minimum(line_start + LINES_PER_PROG, n_lines)
    base = x_ptr + b * s_b + (g * CPG) * s_c + y0 * s_h + x0 * s_w
    cols = tl.arange(0, BLOCK)
    # pass 1: sum
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for line in range(line_start, line_end):
        c = line // RH
        r = line % RH
        row_ptr = base + c * s_c + r * s_h
        for w0 in range(0, RW, BLOCK):
            m = (w0 + cols) < RW
            v = tl.load(row_ptr + (w0 + cols) * s_w, mask=m, other=0.0).to(tl.float32)
            acc += v
    n_here = tl.maximum(line_end - line_start, 0) * RW
    total = tl.sum(acc, axis=0)
    mean = total / tl.maximum(n_here, 1).to(tl.float32)
    # pass 2: squared deviations from this slice's mean
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for line in range(line_start, line_end):
        c = line // RH
        r = line % RH
        row_ptr = base + c * s_c + r * s_h
        for w0 in range(0, RW, BLOCK):
            m = (w0 + cols) < RW
            v = tl.load(row_ptr + (w0 + cols) * s_w, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mean, 0.0)
            acc2 += d * d
    m2 = tl.sum(acc2, axis=0)
    o = out_ptr + (bg * SPLIT + part) * 3
    tl.store(o, n_here.to(tl.float32))
    tl.store(o + 1, mean)
    tl.store(o + 2, m2)


@triton.jit
def _gn_apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, N, C, HW,
                     SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    bc = offs // HW  # b * C + c (contiguous NCHW)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(scale_ptr + bc, mask=m, other=0.0)
    s = tl.load(shift_ptr + bc, mask=m, other=0.0)
    y = x * a + s
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _write_tile_kernel(src_ptr, dst_ptr, RH, RW,
                       ss_b, ss_c, ss_h, ss_w, ds_b, ds_c, ds_h, ds_w, C,
                       BLOCK: tl.constexpr):
    line = tl.program_id(0)  # over B * C * RH
    wblk = tl.program_id(1)
    r = line % RH
    bc = line // RH
    c = bc % C
    b = bc // C
    cols = wblk * BLOCK + tl.arange(0, BLOCK)
    m = cols < RW
    v = tl.load(src_ptr + b * ss_b + c * ss_c + r * ss_h + cols * ss_w, mask=m, other=0.0)
    tl.store(dst_ptr + b * ds_b + c * ds_c + r * ds_h + cols * ds_w, v.to(dst_ptr.dtype.element_ty), mask=m)


def _block(n: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(1, n))))


def group_stats(x: torch.Tensor, groups: int, region: Optional[Region]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """``(count, mean, M2)`` per [B, G] of ``x``'s ``region``, float32."""
    b, c, h, w = x.shape
    y0, y1, x0, x1 = region if region is not None else (0, h, 0, w)
    rh, rw = y1 - y0, x1 - x0
    cpg = c // groups
    n_lines = cpg * rh
    split = max(1, min(64, n_lines // 8))
    lines_per = (n_lines + split - 1) // split
    split = (n_lines + lines_per - 1) // lines_per
    out = torch.empty(b * groups, split, 3, device=x.device, dtype=torch.float32)
    _gn_stats_kernel[(b * groups, split)](x, out, c, groups, cpg, y0, x0, rh, rw,
                                         x.stride(0), x.stride(1), x.stride(2), x.stride(3), lines_per, split,
                                         BLOCK=_block(rw))
    cnt, mean, m2 = out[..., 0], out[..., 1], out[..., 2]
    # Chan merge over the SPLIT partials (vectorised): total mean, then M2 + n_i (mean_i - mean)^2
    n = cnt.sum(1)
    tot_mean = (cnt * mean).sum(1) / n.clamp_min(1)
    tot_m2 = (m2 + cnt * (mean - tot_mean[:, None]) ** 2).sum(1)
    return n.reshape(b, groups), tot_mean.reshape(b, groups), tot_m2.reshape(b, groups)


def group_norm_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    b, c, h, w = xc.shape
    n = xc.numel()
    block = 1024
    _gn_apply_kernel[(triton.cdiv(n, block),)](xc, y, scale.float().contiguous(), shift.float().contiguous(),
                                                n, c, h * w, SILU=bool(silu), BLOCK=block)
    return y


def write_tile(out: torch.Tensor, tile: torch.Tensor, dst: Region, src: Region) -> None:
    dy0, dy1, dx0, dx1 = dst
    sy0, sy1, sx0, sx1 = src
    s = tile[:, :, sy0:sy1, sx0:sx1]
    d = out[:, :, dy0:dy1, dx0:dx1]
    b, c, rh, rw = s.shape
    block = _block(rw)
    _write_tile_kernel[(b * c * rh, triton.cdiv(rw, block))](
        s, d, rh, rw, s.stride(0), s.stride(1), s.stride(2), s.stride(3),
        d.stride(0), d.stride(1), d.stride(2), d.stride(3), c, BLOCK=block)


def probe() -> bool:
    """Run each kernel once on a tiny CUDA tensor and compare with torch; False on any mismatch."""
    x = torch.randn(1, 4, 5, 7, device="cuda")
    n, mean, m2 = group_stats(x, 2, (1, 4, 2, 6))
    ref = x[:, :, 1:4, 2:6].reshape(1, 2, -1)
    ok = torch.allclose(mean, ref.mean(-1), atol=1e-5) and torch.allclose(
        m2, ref.var(-1, unbiased=False) * ref.shape[-1], atol=1e-4)
    sc = torch.rand(1, 4, device="cuda")
    sh = torch.rand(1, 4, device="cuda")
    y = group_norm_apply(x, sc, sh, True)
    ok = ok and torch.allclose(y, torch.nn.functional.silu(x * sc[..., None, None] + sh[..., None, None]),
                               atol=1e-5)
    o = torch.zeros(1, 4, 5, 7, device="cuda")
    write_tile(o, x, (0, 2, 0, 3), (3, 5, 4, 7))
    ok = ok and torch.equal(o[:, :, 0:2, 0:3], x[:, :, 3:5, 4:7])
    return bool(ok)
