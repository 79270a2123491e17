"""Tiled VAE: tiled vs. full decode/encode on the real ldm Encoder/Decoder and diffusers AutoencoderKL.

The reference is always the module's own forward (ldm ``Decoder.forward`` / diffusers ``Decoder.forward``),
which shares no code with the tiled executor. Weights are random (factory, tiny width 32) with GroupNorm affine
parameters randomised too, and inputs carry a low-frequency field (the worst case for per-tile statistics).
"""
from __future__ import annotations

import math

import pytest
import torch

from lib_sdtoolkit.samples import factory
from lib_sdtoolkit.tiled_vae import (NonFiniteError, TiledVAEConfig, patch_vae, plan_for, tiled_decode,
                                     tiled_encode)

torch.set_grad_enabled(False)


def _randomise_norms(vae: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in vae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


@pytest.fixture(scope="session")
def vae32():
    torch.manual_seed(0)
    v = factory.build_ldm_vae("tiny")
    _randomise_norms(v)
    return v


def _latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    field = torch.stack([torch.sin(3 * yy + c) * torch.cos(2 * xx - c) for c in range(4)])[None] * 4
    return field + torch.randn(1, 4, h, w, generator=g)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, yy * xx])[None] * 1.6 - 0.8
    return (base + 0.2 * torch.randn(1, 3, h, w, generator=g)).clamp(-1, 1)


def _report(tag: str, out: torch.Tensor, ref: torch.Tensor, peak: float = 2.0):
    err = (out.float() - ref.float()).abs()
    mse = float((err ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)
    print(f"{tag}: max|d|={float(err.max()):.3g} mean|d|={float(err.mean()):.3g} PSNR={psnr:.1f} dB "
          f"(ref range {float(ref.abs().max()):.3g})")
    return float(err.max()), psnr


# sizes in latent px (non-divisible by the tiles), tile sizes in image px: 24 px = 3 latent px, far below the
# decoder's 11-latent-px convolution halo; budgets: large (checkpoint at every GroupNorm) and small (the
# full-resolution levels are recomputed from low-resolution checkpoints: statistics-only passes)
DECODE_CASES = [
    ((13, 11), 32, None),
    ((9, 10), 24, 1_000_000),
    ((8, 17), 64, 1_500_000),
    ((12, 12), None, 8_000_000),
]


@pytest.mark.parametrize("size,tile,budget", DECODE_CASES)
def test_tiled_decode_matches_full(vae32, size, tile, budget):
    z = vae32.post_quant_conv(_latent(*size))
    ref = vae32.decoder(z)
    cfg = TiledVAEConfig(tile_px=tile, budget_bytes=budget)
    plan = plan_for(vae32.decoder, z.shape, cfg)
    print(plan.describe())
    assert plan.total_tiles > len(plan.steps), "the case must really tile"
    if budget and budget < 2_000_000:
        assert any(s.kind == "stats" for s in plan.steps), "small budget must recompute instead of storing"
    out = tiled_decode(vae32.decoder, z, cfg)
    assert out.shape == ref.shape
    mx, psnr = _report(f"decode {size} tile={tile} budget={budget}", out, ref)
    assert mx <= 2e-5 * max(1.0, float(ref.abs().max()))
    assert psnr >= 100


ENCODE_CASES = [
    ((64, 88), 16, None),
    ((72, 40), 24, 1_500_000),
    ((48, 48), 32, 600_000),
]


@pytest.mark.parametrize("size,tile,budget", ENCODE_CASES)
def test_tiled_encode_matches_full(vae32, size, tile, budget):
    x = _image(*size)
    ref = vae32.encoder(x)
    cfg = TiledVAEConfig(tile_px=tile, budget_bytes=budget)
    plan = plan_for(vae32.encoder, x.shape, cfg)
    print(plan.describe())
    assert plan.total_tiles > len(plan.steps)
    out = tiled_encode(vae32.encoder, x, cfg)
    mx, psnr = _report(f"encode {size} tile={tile} budget={budget}", out, ref, peak=float(ref.abs().max()))
    assert mx <= 2e-5 * max(1.0, float(ref.abs().max()))
    assert psnr >= 100


def test_encode_odd_image_size(vae32):
    """Sizes that are not multiples of 8 go through the same asymmetric-pad downsampling as the full encoder."""
    x = _image(50, 42, seed=3)
    ref = vae32.encoder(x)
    out = tiled_encode(vae32.encoder, x, TiledVAEConfig(tile_px=16))
    assert out.shape == ref.shape
    mx, _ = _report("encode 50x42", out, ref, peak=float(ref.abs().max()))
    assert mx <= 2e-5 * float(ref.abs().max())


@pytest.mark.parametrize("host_budget", [1 << 30, 2_000_000])
def test_offloaded_checkpoints(vae32, host_budget):
    """offload=True (the CUDA default: checkpoints in host RAM, device budget only for one tile + output); on CPU
    the same code path runs with host == device. A tiny device budget must not force recompute when the host
    budget is large."""
    z = vae32.post_quant_conv(_latent(10, 12, 11))
    ref = vae32.decoder(z)
    cfg = TiledVAEConfig(tile_px=32, budget_bytes=400_000, offload=True, host_budget_bytes=host_budget)
    plan = plan_for(vae32.decoder, z.shape, cfg)
    print(plan.describe())
    assert plan.offload and "host RAM" in plan.describe()
    if host_budget > 1e8:
        assert not any(s.kind == "stats" for s in plan.steps)
    else:
        assert any(s.kind == "stats" for s in plan.steps)
    out = tiled_decode(vae32.decoder, z, cfg)
    mx, _ = _report(f"offload host budget {host_budget}", out, ref)
    assert mx <= 2e-5 * float(ref.abs().max())


def test_batch_statistics_are_per_sample(vae32):
    z = vae32.post_quant_conv(torch.cat([_latent(9, 10, 0), 3 * _latent(9, 10, 1) + 2]))
    ref = vae32.decoder(z)
    out = tiled_decode(vae32.decoder, z, TiledVAEConfig(tile_px=32))
    mx, _ = _report("decode batch 2", out, ref)
    assert mx <= 2e-5 * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tiled_is_as_good_as_full(vae32, dtype):
    """fp16/bf16: statistics in fp32; the tiled result is no further from the fp32 full decode than the
    module's own half-precision full decode is (plus a margin of the half-precision step)."""
    z32 = vae32.post_quant_conv(_latent(8, 7, 2))
    ref = vae32.decoder(z32)
    v = factory.build_ldm_vae("tiny")
    v.load_state_dict(vae32.state_dict())
    v.to(dtype)
    z = z32.to(dtype)
    full = v.decoder(z)
    tiled = tiled_decode(v.decoder, z, TiledVAEConfig(tile_px=32))
    assert tiled.dtype == dtype
    e_full, _ = _report(f"{dtype} full vs fp32", full, ref)
    e_tiled, _ = _report(f"{dtype} tiled vs fp32", tiled, ref)
    _report(f"{dtype} tiled vs {dtype} full", tiled, full)
    eps = torch.finfo(dtype).eps * float(ref.abs().max())
    assert e_tiled <= 1.5 * e_full + 4 * eps


def test_nonfinite_fp16_upcasts_or_raises(vae32):
    """An fp16 overflow (SDXL's known problem, forced here by scaling a conv) raises a clear error when
    upcasting is off, and with upcasting on gives the float32 result (the module's dtype is restored)."""
    v = factory.build_ldm_vae("tiny")
    v.load_state_dict(vae32.state_dict())
    v.decoder.mid.block_1.conv1.weight.mul_(1e5)
    z = v.post_quant_conv(_latent(6, 7, 4))
    ref32 = v.decoder(z)
    assert torch.isfinite(ref32).all()
    v.half()
    with pytest.raises(NonFiniteError, match="float32"):
        tiled_decode(v.decoder, z.half(), TiledVAEConfig(tile_px=32, upcast_on_nonfinite=False))
    out = tiled_decode(v.decoder, z.half(), TiledVAEConfig(tile_px=32))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert next(v.parameters()).dtype == torch.float16
    assert float((out.float() - ref32).abs().max()) <= 1e-2 * float(ref32.abs().max())


def test_fast_mode_is_approximate_but_exact_when_estimate_covers_input(vae32):
    z = vae32.post_quant_conv(_latent(44, 36, 5))  # estimate runs at 32 latent px
    ref = vae32.decoder(z)
    plan = plan_for(vae32.decoder, z.shape, TiledVAEConfig(tile_px=64, fast=True))
    assert "approximate" in plan.describe()
    assert not any(s.kind == "stats" for s in plan.steps)
    approx = tiled_decode(vae32.decoder, z, TiledVAEConfig(tile_px=64, fast=True))
    e_approx, p_approx = _report("fast, estimate from a 32-px downscale", approx, ref)
    assert torch.isfinite(approx).all() and e_approx > 1e-4  # really estimated, not exact
    # estimation input as large as the latent: the estimated statistics are the true ones
    same = tiled_decode(vae32.decoder, z, TiledVAEConfig(tile_px=512, fast=True, budget_bytes=1 << 30))
    e_same, _ = _report("fast, estimate at full size", same, ref)
    assert e_same <= 2e-5 * float(ref.abs().max())


def test_diffusers_autoencoderkl_same_weights(vae32):
    from lib_sdtoolkit.arch import keymaps

    dv = factory.build_diffusers_vae("tiny")
    dv.load_state_dict(keymaps.convert_vae_ldm_to_diffusers(vae32.state_dict()), strict=True)
    z = _latent(11, 9, 6)
    ref = dv.decode(z).sample
    out = tiled_decode(dv.decoder, dv.post_quant_conv(z), TiledVAEConfig(tile_px=24, budget_bytes=1_500_000))
    mx, psnr = _report("diffusers decode tiled vs its full", out, ref)
    assert mx <= 2e-5 * float(ref.abs().max()) and psnr >= 100
    ldm_ref = vae32.decoder(vae32.post_quant_conv(z))
    _report("diffusers tiled vs ldm full", out, ldm_ref)
    assert float((out - ldm_ref).abs().max()) <= 1e-4
    x = _image(40, 56, 7)
    eref = dv.encoder(x)
    eout = tiled_encode(dv.encoder, x, TiledVAEConfig(tile_px=16))
    mx, _ = _report("diffusers encode tiled vs its full", eout, eref, peak=float(eref.abs().max()))
    assert mx <= 2e-5 * float(eref.abs().max())


def test_per_tile_statistics_would_fail_this_test(vae32):
    """Guard that the comparison can fail: decoding each tile on its own (own GroupNorm statistics, as the
    blending tilers do) is far outside the tolerance the exact tests use."""
    z = vae32.post_quant_conv(_latent(16, 16, 8))
    ref = vae32.decoder(z)
    left = vae32.decoder(z[:, :, :, :8])
    err = float((left - ref[:, :, :, :64]).abs().max())
    print(f"independent-tile decode error {err:.3g}")
    assert err > 1e-2


def test_patch_vae_restores_after_exception(vae32):
    orig_dec = vae32.decoder.forward
    assert "forward" not in vae32.decoder.__dict__
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with patch_vae(vae32, TiledVAEConfig(tile_px=32), TiledVAEConfig(tile_px=32,
                                                                           progress=lambda d, t: calls.append(d))):
            assert getattr(vae32.decoder.forward, "__sdtoolkit_tiled__", False)
            z = vae32.post_quant_conv(_latent(8, 9, 9))
            out = vae32.decoder(z)
            assert calls, "the patched forward must run the tiled decode"
            assert torch.allclose(out, orig_dec(z), atol=1e-4)
            raise RuntimeError("boom")
    assert "forward" not in vae32.decoder.__dict__ and "forward" not in vae32.encoder.__dict__
    assert vae32.decoder.forward == orig_dec


def test_plan_reports_pixels_and_bounded_memory(vae32):
    z_shape = (1, 4, 64, 64)  # 512x512 image, only planned
    big = plan_for(vae32.decoder, z_shape, TiledVAEConfig(budget_bytes=1 << 34))
    small = plan_for(vae32.decoder, z_shape, TiledVAEConfig(budget_bytes=20 << 20))
    print(big.describe())
    print(small.describe())
    assert "px" in small.describe() and small.tile_px % 8 == 0
    assert small.peak_estimate < big.peak_estimate
    assert small.total_tiles > big.total_tiles


def test_should_stop_after_n_tiles_raises_and_returns_nothing(vae32):
    from lib_sdtoolkit.errors import SdToolkitError
    from lib_sdtoolkit.tiled_vae import TiledVAEInterrupted

    z = vae32.post_quant_conv(_latent(16, 16, seed=4))
    events, asked = [], []

    def should_stop():
        asked.append(len(events))
        return len(events) > 3           # the user presses stop once 3 tiles are done

    cfg = TiledVAEConfig(tile_px=32, progress=lambda d, t: events.append((d, t)), should_stop=should_stop)
    out = None
    with pytest.raises(TiledVAEInterrupted, match="interrupted after 3 of") as e:
        out = tiled_decode(vae32.decoder, z, cfg)
    assert isinstance(e.value, SdToolkitError) and out is None
    total = events[0][1]
    assert events == [(0, total), (1, total), (2, total), (3, total)] and total > 3   # stopped right there
    assert asked[-1] == 4
    # the same config without a stop request runs to the end (every tile reported once)
    events.clear()
    full = tiled_decode(vae32.decoder, z, TiledVAEConfig(tile_px=32, progress=lambda d, t: events.append(d),
                                                         should_stop=lambda: False))
    assert events == list(range(total + 1)) and full.shape[-1] == 128


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_checkpoints_write_only_their_activation(vae32, monkeypatch, kind):
    """With a checkpoint at every GroupNorm, each checkpoint pass writes its activation once and nothing else:
    a ResNet block's pending residual is the same tensor as the activation before norm1 (one buffer) and is carried
    unchanged past norm2 (not copied tile by tile again). The elements written are counted at ``write_tile`` (the
    real one runs) and must equal the activations' sizes at the checkpoints plus the output; the exactness tests
    above check the values."""
    from lib_sdtoolkit.tiled_vae import executor
    from lib_sdtoolkit.tiled_vae.graph import build_program

    written = []
    real = executor.write_tile

    def counting(out, tile, dst, src):
        written.append(out.shape[0] * out.shape[1] * (dst[1] - dst[0]) * (dst[3] - dst[2]))
        real(out, tile, dst, src)

    monkeypatch.setattr(executor, "write_tile", counting)
    mod = vae32.decoder if kind == "decoder" else vae32.encoder
    x = vae32.post_quant_conv(_latent(12, 12, 5)) if kind == "decoder" else _image(48, 48, 5)
    cfg = TiledVAEConfig(tile_px=32 if kind == "decoder" else 16, budget_bytes=1 << 34)
    plan = plan_for(mod, x.shape, cfg)
    assert not any(s.kind == "stats" for s in plan.steps) and plan.total_tiles > len(plan.steps)
    pts = executor.shape_points(build_program(mod), *x.shape[1:])
    expect = sum(pts[s.target].c * pts[s.target].h * pts[s.target].w for s in plan.steps if s.kind == "ckpt")
    expect += pts[-1].c * pts[-1].h * pts[-1].w
    out = (tiled_decode if kind == "decoder" else tiled_encode)(mod, x, cfg)
    ref = mod(x)
    assert float((out - ref).abs().max()) <= 2e-5 * max(1.0, float(ref.abs().max()))
    assert sum(written) == expect
