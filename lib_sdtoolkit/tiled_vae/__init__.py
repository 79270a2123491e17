"""Exact tiled VAE decode/encode with bounded memory.

Public API::

    from lib_sdtoolkit.tiled_vae import TiledVAEConfig, tiled_decode, tiled_encode, plan_for, patch_vae
    img = tiled_decode(vae.decoder, vae.post_quant_conv(z), TiledVAEConfig(tile_px=512))   # == vae.decoder(...)
    h = tiled_encode(vae.encoder, x)                                                      # == vae.encoder(x)
    with patch_vae(vae, cfg):  # vae.encoder / vae.decoder forward replaced for the duration only
        ...

``tiled_decode``/``tiled_encode`` take the ldm ``Decoder``/``Encoder`` (the WebUI's
``shared.sd_model.first_stage_model.decoder``) or diffusers ``AutoencoderKL.decoder``/``.encoder`` and return what
the module's forward returns, to float round-off (exact mode), or with approximate statistics (``fast=True``).
See :mod:`.executor` for the algorithm and the memory/recompute trade-off; :mod:`.vae` for whole-VAE helpers
(scaling factor, diffusers/ldm wrappers, loading from files).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..ops.groupnorm import norm_affine
from .executor import NonFiniteError, Plan, RunOptions, TiledVAEInterrupted, make_plan, run_plan
from .graph import Program, build_program, param_device, param_dtype

__all__ = ["TiledVAEConfig", "tiled_decode", "tiled_encode", "plan_for", "memory_budget", "patch_vae",
           "install_patch", "unpatch", "VAEPatchGuard",
           "NonFiniteError", "TiledVAEInterrupted", "Plan", "default_tile_px"]


@dataclass
class TiledVAEConfig:
    """Options of one tiled run.

    tile_px: core tile size in *image* pixels (rounded down to a multiple of 8); None = chosen per pass from the
        memory budget. budget_bytes: memory for checkpoints + one tile; None = 80% of free CUDA memory, or half
        the available RAM on CPU. fast: estimate GroupNorm statistics from a downscaled pass (approximate; no
        statistics passes). offload: keep full-size checkpoints in host RAM (default on CUDA): the device
        only holds the output and one tile, and the run recomputes almost nothing. upcast_on_nonfinite: on NaN/inf in fp16/bf16, rerun in float32 (else raise
        :class:`NonFiniteError`). device: run the network there for the call (e.g. "cuda"), then move it back.
        progress(done, total): (0, total) at the start of each run, then after every tile. should_stop(): asked
        after every tile and before every attention pass; True raises :class:`TiledVAEInterrupted` (nothing is
        returned, a patched VAE stays patched until its guard/context restores it).
    """

    tile_px: Optional[int] = None
    budget_bytes: Optional[int] = None
    fast: bool = False
    upcast_on_nonfinite: bool = True
    device: Optional[Union[str, torch.device]] = None
    offload: Optional[bool] = None            # checkpoints in host RAM; None = on for CUDA runs
    host_budget_bytes: Optional[int] = None   # RAM for offloaded checkpoints; None = half the available RAM
    progress: Optional[Callable[[int, int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    max_tiles_per_pass: Optional[int] = None  # benchmarking only (bounded run, wrong output)
    skip_attention_scores: bool = False       # benchmarking only (bounded run, wrong output)
    log: Optional[Callable[[str], None]] = None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device: Union[str, torch.device, None] = None) -> int:
    """Bytes a tiled run may use on ``device``: 80% of free CUDA memory (incl. the caching allocator's free
    blocks) or half of the available RAM on CPU (4 GiB when unknown)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int((free + cached) * 0.8)
    avail = _meminfo_available()
    return int(avail * 0.5) if avail else 4 << 30


def default_tile_px(device: Union[str, torch.device, None] = None, kind: str = "decoder") -> int:
    """A tile size suggestion in image pixels for UIs (the planner sizes tiles itself when tile_px is None)."""
    b = memory_budget(device)
    # one decoder tile costs ~ 3 * 256 ch * px^2 * 4 B at full resolution (fp32), use a third of the budget
    per_px = 3 * 256 * 4 if kind == "decoder" else 3 * 128 * 4
    px = int(((b / 3) / per_px) ** 0.5) // 64 * 64
    return max(256, min(px, 4096))


def _budget(cfg: TiledVAEConfig, dev: torch.device) -> int:
    return int(cfg.budget_bytes) if cfg.budget_bytes else memory_budget(dev)


def _host_budget(cfg: TiledVAEConfig, dev: torch.device) -> Optional[int]:
    off = cfg.offload if cfg.offload is not None else dev.type == "cuda"
    if not off:
        return None
    return int(cfg.host_budget_bytes) if cfg.host_budget_bytes else memory_budget("cpu")


def plan_for(module: nn.Module, shape, cfg: Optional[TiledVAEConfig] = None,
             dtype: Optional[torch.dtype] = None) -> Plan:
    """The plan a run on an input of ``shape`` ([B, C, H, W]) would follow (nothing is computed)."""
    cfg = cfg or TiledVAEConfig()
    prog = build_program(module)
    dt = dtype or param_dtype(module)
    dev = torch.device(cfg.device) if cfg.device else param_device(module)
    return make_plan(prog, tuple(shape), torch.empty((), dtype=dt).element_size(), _budget(cfg, dev),
                     cfg.tile_px, cfg.fast, host_budget=_host_budget(cfg, dev))


def _estimate_stats(prog: Program, x: torch.Tensor, cfg: TiledVAEConfig, budget: int
                    ) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Fast mode: run the network on a downscaled copy of the input (long side = the tile size, at least 32
    latent px), re-standardised per channel to the input's mean/std, and keep every GroupNorm's statistics."""
    b, c, h, w = x.shape
    lat_div = 8 if prog.kind == "encoder" else 1
    tile = (cfg.tile_px or 512) // 8 * lat_div
    tile = max(tile, 32 * lat_div)
    s = min(1.0, tile / max(h, w))
    if s < 1.0:
        nh, nw = max(lat_div * 4, int(h * s) // lat_div * lat_div), max(lat_div * 4, int(w * s) // lat_div * lat_div)
        small = F.interpolate(x.float(), size=(nh, nw), mode="nearest-exact")
        xm, xs = x.float().mean((2, 3), keepdim=True), x.float().std((2, 3), keepdim=True)
        sm, ss = small.mean((2, 3), keepdim=True), small.std((2, 3), keepdim=True)
        small = ((small - sm) / ss.clamp_min(1e-6) * xs + xm).clamp(x.min().item(), x.max().item()).to(x.dtype)
    else:
        small = x
    plan = make_plan(prog, tuple(small.shape), small.element_size(), max(budget, 1 << 40), None, False)
    _, stats = run_plan(prog, plan, small)
    aff = {}
    for i, st in stats.items():
        op = prog.ops[i]
        aff[i] = norm_affine(st, op.module.weight, op.module.bias, op.module.eps, op.module.num_channels)
    return aff


def _run(module: nn.Module, x: torch.Tensor, cfg: TiledVAEConfig, expect: str) -> torch.Tensor:
    prog = build_program(module)
    if prog.kind != expect:
        raise InvalidInputError(f"expected a VAE {expect}, got an {prog.kind} ({type(module).__name__})")
    if x.ndim != 4:
        raise InvalidInputError(f"{expect} input must be [B, C, H, W], got shape {tuple(x.shape)}")
    mdev = param_device(module)
    dev = torch.device(cfg.device) if cfg.device else mdev
    in_dev = x.device
    moved = dev != mdev
    try:
        if moved:
            module.to(dev)
        xin = x.to(dev, param_dtype(module))
        try:
            out = _run_once(prog, xin, cfg, dev)
        except NonFiniteError:
            if not cfg.upcast_on_nonfinite or xin.dtype == torch.float32:
                raise
            orig = param_dtype(module)
            if cfg.log:
                cfg.log(f"tiled VAE: NaN/inf in {orig}; rerunning in float32")
            module.float()
            try:
                out = _run_once(build_program(module), xin.float(), cfg, dev).to(orig)
            finally:
                module.to(orig)
        return out.to(in_dev)
    finally:
        if moved:
            module.to(mdev)


def _run_once(prog: Program, x: torch.Tensor, cfg: TiledVAEConfig, dev: torch.device) -> torch.Tensor:
    budget = _budget(cfg, dev)
    affine = _estimate_stats(prog, x, cfg, budget) if cfg.fast else None
    host = _host_budget(cfg, dev)
    plan = make_plan(prog, tuple(x.shape), x.element_size(), budget, cfg.tile_px, cfg.fast,
                     known=list(affine) if affine else None, host_budget=host)
    if cfg.log:
        cfg.log(plan.describe())
    out, _ = run_plan(prog, plan, x, affine, RunOptions(
        cfg.progress, cfg.should_stop, cfg.max_tiles_per_pass, cfg.skip_attention_scores,
        checkpoint_device=torch.device("cpu") if host is not None else None))
    if not cfg.max_tiles_per_pass and not torch.isfinite(out).all():
        raise NonFiniteError(f"NaN/inf in the {prog.kind} output ({x.dtype}); run the VAE in float32 "
                             "(WebUI: --no-half-vae)")
    return out


def tiled_decode(decoder: nn.Module, z: torch.Tensor, cfg: Optional[TiledVAEConfig] = None) -> torch.Tensor:
    """``decoder(z)`` computed tile by tile (``z`` is the decoder input, i.e. after ``post_quant_conv``)."""
    return _run(decoder, z, cfg or TiledVAEConfig(), "decoder")


def tiled_encode(encoder: nn.Module, x: torch.Tensor, cfg: Optional[TiledVAEConfig] = None) -> torch.Tensor:
    """``encoder(x)`` computed tile by tile (``x`` in [-1, 1]; returns the moments before ``quant_conv``)."""
    return _run(encoder, x, cfg or TiledVAEConfig(), "encoder")


def install_patch(vae: nn.Module, encoder_cfg: Optional[TiledVAEConfig] = None,
                  decoder_cfg: Optional[TiledVAEConfig] = None) -> list:
    """Put tiled ``forward`` instance attributes on ``vae.encoder`` / ``vae.decoder`` (``None``: that half is left
    alone). Returns the token :func:`unpatch` needs to restore exactly what was there."""
    saved = []
    try:
        for part, cfg, fn in (("encoder", encoder_cfg, tiled_encode), ("decoder", decoder_cfg, tiled_decode)):
            mod = getattr(vae, part, None)
            if cfg is None or mod is None:
                continue
            had = "forward" in mod.__dict__
            saved.append((mod, had, mod.__dict__.get("forward")))
            mod.forward = _make_forward(mod, cfg, fn)
    except BaseException:
        unpatch(saved)
        raise
    return saved


@contextlib.contextmanager
def patch_vae(vae: nn.Module, encoder_cfg: Optional[TiledVAEConfig] = None,
              decoder_cfg: Optional[TiledVAEConfig] = None) -> Iterator[None]:
    """Replace ``vae.encoder.forward`` / ``vae.decoder.forward`` (instance attributes) by tiled versions for the
    duration of the block; restored on exit, also on error. ``None`` leaves that half alone."""
    saved = install_patch(vae, encoder_cfg, decoder_cfg)
    try:
        yield
    finally:
        unpatch(saved)


def _make_forward(mod: nn.Module, cfg: TiledVAEConfig, fn):
    def forward(x, *args, **kwargs):
        return fn(mod, x, cfg)
    forward.__sdtoolkit_tiled__ = True  # type: ignore[attr-defined]
    return forward


def unpatch(saved) -> None:
    for mod, had, prev in reversed(saved):
        if had:
            mod.forward = prev
        else:
            mod.__dict__.pop("forward", None)


class VAEPatchGuard:
    """Holds at most one installed patch (for a host's generation). ``install`` first restores any patch left
    over (e.g. by a generation that failed before its clean-up ran); ``restore`` is idempotent."""

    def __init__(self) -> None:
        self._saved: Optional[list] = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def install(self, vae: nn.Module, encoder_cfg: Optional[TiledVAEConfig],
                decoder_cfg: Optional[TiledVAEConfig]) -> None:
        self.restore()
        self._saved = install_patch(vae, encoder_cfg, decoder_cfg)

    def restore(self) -> bool:
        saved, self._saved = self._saved, None
        if saved is None:
            return False
        unpatch(saved)
        return True
