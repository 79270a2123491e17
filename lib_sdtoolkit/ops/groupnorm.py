"""GroupNorm split into its two halves, for tiled networks.

A tiled VAE cannot call ``nn.GroupNorm`` on a tile: the statistics must be those of the whole tensor. So the
norm is split into

* :func:`group_stats` -- per (sample, group) ``count``, ``mean`` and ``M2`` (sum of squared deviations) of a
  tile's *core* region, always in float32 whatever the tensor's dtype (fp16 SDXL activations overflow a float16
  variance);
* :func:`merge_stats` -- Chan et al.'s parallel combination of two such partial results (exact: it counts the
  between-tile mean differences, ``delta**2 * n_a * n_b / n``, which a plain average of tile variances leaves out);
* :func:`norm_affine` -- turns merged statistics and the norm's weight/bias into a per-channel ``scale``/``shift``;
* :func:`group_norm_apply` -- ``y = x * scale + shift`` (optionally followed by SiLU), one pass;
* :func:`write_tile` -- copy a tile's core into the output tensor.

Each public function dispatches to a Triton kernel (``triton_kernels``) for CUDA tensors when Triton imports and
a one-time probe succeeds, and to plain PyTorch otherwise (CPU, MPS, ROCm without Triton, Windows). The PyTorch
path is the reference the kernels are tested against. Set ``SDTOOLKIT_NO_TRITON=1`` to force the fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Region = Tuple[int, int, int, int]  # y0, y1, x0, x1 in the tensor's own coordinates

__all__ = ["GNStats", "group_stats", "merge_stats", "norm_affine", "group_norm_apply", "write_tile",
           "triton_available", "full_group_stats"]


@dataclass
class GNStats:
    """Mergeable GroupNorm statistics, each ``[B, G]`` float32: element count, mean, sum of squared deviations."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count.clamp_min(1)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())


_TRITON_STATE: dict = {}


def triton_available(device: Optional[torch.device] = None) -> bool:
    """True when the Triton kernels can run on ``device`` (a CUDA device): triton imports, the probe passed and
    ``SDTOOLKIT_NO_TRITON`` is not set. The probe runs once per process."""
    if os.environ.get("SDTOOLKIT_NO_TRITON"):
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    if "ok" not in _TRITON_STATE:
        try:
            from . import triton_kernels  # noqa: F401  (imports triton)
            _TRITON_STATE["ok"] = bool(triton_kernels.probe())
        except Exception:  # no triton, or a broken install: fall back silently
            _TRITON_STATE["ok"] = False
    return _TRITON_STATE["ok"]


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available(x.device)


# --------------------------------------------------------------------------------------------------- statistics

def _torch_group_stats(x: torch.Tensor, groups: int, region: Optional[Region]) -> GNStats:
    """Corrected two-pass statistics (Chan, Golub & LeVeque 1983), one group at a time, on a view of the region:
    no copy of a (non-contiguous) tile region, one group-sized float32 temporary. About 5x faster on CPU than
    ``torch.var_mean`` (a per-element Welford update) at the same accuracy: the mean from a float32 sum, then the
    deviations from it summed (the correction term) and squared."""
    if region is not None:
        y0, y1, x0, x1 = region
        x = x[:, :, y0:y1, x0:x1]
    b, c, h, w = x.shape
    cpg = c // groups
    n = cpg * h * w
    xg = x.unflatten(1, (groups, cpg))  # a view: [B, G, C/G, H, W]
    mean = xg.sum((2, 3, 4), dtype=torch.float32) / n
    s1 = torch.empty_like(mean)
    s2 = torch.empty_like(mean)
    buf = torch.empty((b, cpg, h, w), dtype=torch.float32, device=x.device)
    for j in range(groups):
        torch.sub(xg[:, j], mean[:, j].reshape(b, 1, 1, 1), out=buf)
        s1[:, j] = buf.sum((1, 2, 3))
        s2[:, j] = buf.square_().sum((1, 2, 3))
    count = torch.full_like(mean, float(n))
    return GNStats(count, mean + s1 / n, (s2 - s1 * s1 / n).clamp_min(0.0))


def group_stats(x: torch.Tensor, groups: int, region: Optional[Region] = None) -> GNStats:
    """Statistics of ``x`` ([B, C, H, W], any float dtype) per sample and group over ``region`` (default: all),
    computed in float32."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if region is not None:
        y0, y1, x0, x1 = region
        if not (0 <= y0 < y1 <= x.shape[2] and 0 <= x0 < x1 <= x.shape[3]):
            raise ValueError(f"region {region} outside a tensor of shape {tuple(x.shape)}")
    if _use_triton(x):
        from . import triton_kernels
        return GNStats(*triton_kernels.group_stats(x, groups, region))
    return _torch_group_stats(x, groups, region)


def full_group_stats(x: torch.Tensor, groups: int, rows_per_chunk: int = 0) -> GNStats:
    """Statistics of a whole (possibly huge) tensor, in row chunks merged with :func:`merge_stats` so that no
    float32 copy of the full tensor is made."""
    h = x.shape[2]
    if rows_per_chunk <= 0:
        per_row = max(1, x.shape[0] * x.shape[1] * x.shape[3])
        rows_per_chunk = max(1, (16 << 20) // per_row)
    acc: Optional[GNStats] = None
    for y in range(0, h, rows_per_chunk):
        s = group_stats(x, groups, (y, min(h, y + rows_per_chunk), 0, x.shape[3]))
        acc = s if acc is None else merge_stats(acc, s)
    assert acc is not None
    return acc


def merge_stats(a: GNStats, b: GNStats) -> GNStats:
    """Chan's parallel formula: exact statistics of the union of two disjoint sets, float32."""
    n = a.count + b.count
    delta = b.mean - a.mean
    wb = b.count / n.clamp_min(1)
    mean = a.mean + delta * wb
    m2 = a.m2 + b.m2 + delta * delta * a.count * wb
    return GNStats(n, mean, m2)


def merge_all(parts: Sequence[GNStats]) -> GNStats:
    """Pairwise (tree) merge of many partial statistics; tree order keeps the round-off at log2(n) steps."""
    if not parts:
        raise ValueError("no statistics to merge")
    items = list(parts)
    while len(items) > 1:
        nxt = [merge_stats(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            nxt.append(items[-1])
        items = nxt
    return items[0]


def norm_affine(stats: GNStats, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) float32 ``scale`` and ``shift`` such that ``GroupNorm(x) == x * scale + shift``."""
    b, g = stats.mean.shape
    rstd = torch.rsqrt(stats.var + eps)  # [B, G]
    cpg = channels // g
    rstd_c = rstd.repeat_interleave(cpg, dim=1)
    mean_c = stats.mean.repeat_interleave(cpg, dim=1)
    w = weight.float().reshape(1, channels).to(rstd.device) if weight is not None else torch.ones(
        1, channels, device=rstd.device)
    bb = bias.float().reshape(1, channels).to(rstd.device) if bias is not None else torch.zeros(
        1, channels, device=rstd.device)
    scale = rstd_c * w
    shift = bb - mean_c * scale
    return scale, shift


# ------------------------------------------------------------------------------------------------------- apply

def _torch_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    b, c = x.shape[0], x.shape[1]
    y = torch.addcmul(shift.reshape(b, c, 1, 1), x.float(), scale.reshape(b, c, 1, 1))
    if silu:
        y = F.silu(y, inplace=True)
    return y.to(x.dtype)


def group_norm_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """``silu?(x * scale + shift)`` with per-(sample, channel) float32 ``scale``/``shift`` ([B, C]); computed in
    float32, returned in ``x``'s dtype."""
    if _use_triton(x):
        from . import triton_kernels
        return triton_kernels.group_norm_apply(x, scale, shift, silu)
    return _torch_apply(x, scale, shift, silu)


def write_tile(out: torch.Tensor, tile: torch.Tensor, dst: Region, src: Region) -> None:
    """``out[:, :, dst] = tile[:, :, src]`` (cast to ``out``'s dtype); the regions must have the same size."""
    dy0, dy1, dx0, dx1 = dst
    sy0, sy1, sx0, sx1 = src
    if (dy1 - dy0, dx1 - dx0) != (sy1 - sy0, sx1 - sx0):
        raise ValueError(f"tile write-back: region sizes differ ({dst} vs {src})")
    if _use_triton(out) and tile.device == out.device:
        from . import triton_kernels
        triton_kernels.write_tile(out, tile, dst, src)
        return
    out[:, :, dy0:dy1, dx0:dx1].copy_(tile[:, :, sy0:sy1, sx0:sx1])
