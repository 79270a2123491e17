"""GroupNorm split ops (statistics over a core region, Chan merge, apply+SiLU, tile write-back) against plain
torch (``F.group_norm`` / ``torch.var_mean`` on the whole tensor), and the Triton kernels against the fallback."""
from __future__ import annotations

import importlib.util
import py_compile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib_sdtoolkit.ops import groupnorm as gn

KERNELS = Path(gn.__file__).with_name("triton_kernels.py")


def _x(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 23, 17, generator=g) * 3 + 40).to(device=device, dtype=dtype)


def test_chan_merge_of_core_regions_equals_whole_tensor_stats():
    x = _x()
    # four disjoint core regions of uneven size, means differ strongly between them
    x[:, :, :9] += 25
    parts = [gn.group_stats(x, 4, r) for r in [(0, 9, 0, 5), (0, 9, 5, 17), (9, 23, 0, 12), (9, 23, 12, 17)]]
    st = gn.merge_all(parts)
    var, mean = torch.var_mean(x.double().reshape(2, 4, -1), dim=-1, correction=0)
    assert torch.allclose(st.mean.double(), mean, rtol=1e-6)
    assert torch.allclose(st.var.double(), var, rtol=1e-5)
    # the average of per-tile variances (no between-tile term) is measurably wrong here
    naive = sum(p.var * p.count for p in parts) / sum(p.count for p in parts)
    assert float((naive.double() - var).abs().max()) > 1.0


def test_apply_with_merged_stats_equals_group_norm_silu():
    x = _x()
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    st = gn.full_group_stats(x, 4, rows_per_chunk=5)
    sc, sh = gn.norm_affine(st, w, b, 1e-6, 16)
    y = gn.group_norm_apply(x, sc, sh, silu=True)
    ref = F.silu(F.group_norm(x, 4, w, b, 1e-6))
    assert torch.allclose(y, ref, atol=2e-5)


def test_statistics_of_a_far_offset_region_keep_the_variance():
    """mean/std = 1e5 inside a non-contiguous region: sum-of-squares formulas lose every digit of the variance in
    float32; the corrected two-pass statistics must match a float64 reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 40, 36, generator=g) * 0.01 + 1000.0
    st = gn.group_stats(x, 8, (3, 37, 5, 30))
    r = x[:, :, 3:37, 5:30].double().reshape(2, 8, -1)
    var, mean = torch.var_mean(r, dim=-1, correction=0)
    assert torch.allclose(st.mean.double(), mean, rtol=1e-7)
    assert torch.allclose(st.var.double(), var, rtol=1e-3)
    assert torch.equal(st.count, torch.full((2, 8), 4.0 * 34 * 25))


def test_half_inputs_reduce_in_float32():
    x = _x(torch.float16) * 300  # squares overflow fp16
    st = gn.group_stats(x, 4)
    assert st.mean.dtype == torch.float32 and st.finite()
    var, mean = torch.var_mean(x.float().reshape(2, 4, -1), dim=-1, correction=0)
    assert torch.allclose(st.var, var, rtol=1e-4)


def test_write_tile():
    out = torch.zeros(1, 3, 8, 8)
    tile = torch.arange(3 * 5 * 6, dtype=torch.float32).reshape(1, 3, 5, 6)
    gn.write_tile(out, tile, (2, 5, 1, 5), (1, 4, 2, 6))
    assert torch.equal(out[:, :, 2:5, 1:5], tile[:, :, 1:4, 2:6]) and out.sum() == tile[:, :, 1:4, 2:6].sum()


def test_triton_kernels_file_compiles():
    py_compile.compile(str(KERNELS), doraise=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_import():
    from lib_sdtoolkit.ops import triton_kernels

    assert callable(triton_kernels.group_stats) and callable(triton_kernels.probe)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_agrees_with_fallback(dtype):
    from lib_sdtoolkit.ops import triton_kernels as tk

    x = _x(dtype, "cuda")
    region = (3, 20, 2, 15)
    n, mean, m2 = tk.group_stats(x, 4, region)
    ref = gn._torch_group_stats(x, 4, region)
    assert torch.allclose(mean, ref.mean, rtol=1e-5, atol=1e-4) and torch.allclose(m2, ref.m2, rtol=1e-4)
    sc, sh = torch.rand(2, 16, device="cuda"), torch.randn(2, 16, device="cuda")
    for silu in (False, True):
        y = tk.group_norm_apply(x, sc, sh, silu)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(y.float(), gn._torch_apply(x, sc, sh, silu).float(), rtol=tol, atol=tol)
    out = torch.zeros(2, 16, 30, 30, device="cuda", dtype=dtype)
    tk.write_tile(out, x, (1, 18, 4, 17), region)
    assert torch.equal(out[:, :, 1:18, 4:17], x[:, :, 3:20, 2:15])
