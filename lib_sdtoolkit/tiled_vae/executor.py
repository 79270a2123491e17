"""Exact tiled execution of a VAE :class:`~.graph.Program` under a memory budget.

How it works (memory vs. recompute)
-----------------------------------
The only non-local parts of the SD VAE are its GroupNorms (statistics over the whole tensor) and the mid-block
attention. Everything between two GroupNorms is convolutions, so a tile whose input region is grown by the
exact receptive field of those convolutions (computed per op by interval arithmetic, see :func:`_backward`)
produces bit-for-bit the same core values as the full network -- *if* every GroupNorm it passes is applied with
the statistics of the full tensor.

The executor walks the ops once. A **checkpoint** is the full network state (activation + pending residuals)
before some op. At each GroupNorm whose statistics are still unknown it either

* **materialises** a new checkpoint there (runs every tile from the current checkpoint up to that op and
  writes the tiles' cores into full tensors; the statistics are then read off the full tensor) -- costs the
  memory of the new checkpoint, no recompute; or
* runs a **statistics pass** (runs every tile from the current checkpoint up to that op, keeps only per-tile
  ``count/mean/M2`` of the core, merged with Chan's formula in fp32) -- costs recompute, no memory.

It materialises whenever the new checkpoint, the current one, the output and one tile's working set fit the
budget; so with a large budget every op runs once (about the cost of a full decode) and with a small one the
high-resolution levels are recomputed from a low-resolution checkpoint (memory bounded by a latent-resolution
state plus one tile, compute up to ~3x). The attention block needs its whole input: a checkpoint is always
materialised before it (at 1/8 scale this is cheap) and it runs globally with query-chunked exact attention.
A final pass runs every tile to the end and writes its core into the output.

On CUDA the checkpoints are by default **offloaded** to host RAM (``RunOptions.checkpoint_device``): the GPU
then holds only the output and one tile's working set, the host holds the checkpoints, and nearly nothing is
recomputed (each tile's input crop crosses PCIe once per GroupNorm phase). When a checkpoint is materialised,
the statistics of the GroupNorm at that point are gathered from the tiles' cores as they are written (no second
read of the full tensor).

All decisions depend only on shapes and the budget, so :func:`make_plan` computes them up front (tile counts
for progress, an estimate of peak memory, and the tile size in pixels for the user).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, SdToolkitError
from ..ops.groupnorm import (GNStats, full_group_stats, group_norm_apply, group_stats, merge_all, norm_affine,
                             write_tile)
from .graph import AttnParams, Program

Region = Tuple[int, int, int, int]  # y0, y1, x0, x1 (global coordinates at one resolution)


class NonFiniteError(SdToolkitError):
    """NaN/inf in a VAE activation (the SDXL VAE overflows float16)."""


class TiledVAEInterrupted(SdToolkitError):
    """The caller asked to stop (``should_stop`` returned True); the run returns nothing."""


# ------------------------------------------------------------------------------------------------------ shapes

@dataclass
class Point:
    """The state *before* op ``i``: activation channels/size, pending residual channels, scale exponent."""

    c: int
    h: int
    w: int
    stack: Tuple[Tuple[int, int, int], ...]
    k: int  # resolution = latent * 2**k


def shape_points(prog: Program, c: int, h: int, w: int) -> List[Point]:
    downs = sum(1 for o in prog.ops if o.kind == "down")
    pts = [Point(c, h, w, (), downs)]
    stack: List[Tuple[int, int, int]] = []
    k = downs
    for op in prog.ops:
        if op.kind == "conv":
            c = op.module.out_channels
        elif op.kind == "up":
            h, w, k = h * 2, w * 2, k + 1
        elif op.kind == "down":
            if h < 2 or w < 2:
                raise InvalidInputError(f"input too small to encode ({h}x{w} at {op.name})")
            h, w, k = (h - 2) // 2 + 1, (w - 2) // 2 + 1, k - 1
            c = op.module.out_channels
        elif op.kind == "push":
            stack.append((c, h, w))
        elif op.kind == "add":
            stack.pop()
        pts.append(Point(c, h, w, tuple(stack), k))
    return pts


def _grid_bounds(n_lat: int, tile: int, n: int, k: int) -> List[Tuple[int, int]]:
    """Core intervals along one axis at a point of size ``n`` and scale ``2**k`` for latent tiles of ``tile``."""
    f = 2 ** k
    cuts = list(range(0, n_lat, tile))
    out = []
    for j, a in enumerate(cuts):
        lo = min(a * f, n)
        hi = n if j == len(cuts) - 1 else min((a + tile) * f, n)
        if hi > lo:
            out.append((lo, hi))
    return out


# ------------------------------------------------------------------------------------------- region arithmetic

def _expand(r: Region, p: int, h: int, w: int) -> Region:
    return (max(0, r[0] - p), min(h, r[1] + p), max(0, r[2] - p), min(w, r[3] + p))


def _union(a: Region, b: Region) -> Region:
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _backward(prog: Program, pts: Sequence[Point], start: int, target: int, core: Region
              ) -> Tuple[Region, List[Region], List[Region], List[Optional[Region]]]:
    """Regions needed so that the state before op ``target`` is exact on ``core``.

    Returns (activation region at ``start``, residual regions at ``start`` bottom..top, region of the activation
    after each op ``start..target-1``, residual input region for each ``add`` with a shortcut)."""
    cur = core
    bstack: List[Region] = [core] * len(pts[target].stack)
    after: List[Region] = [core] * (target - start)
    short: List[Optional[Region]] = [None] * (target - start)
    for i in range(target - 1, start - 1, -1):
        op = prog.ops[i]
        after[i - start] = cur
        pin = pts[i]
        if op.kind == "conv":
            cur = _expand(cur, op.pad, pin.h, pin.w)
        elif op.kind == "up":
            cur = (cur[0] // 2, -(-cur[1] // 2), cur[2] // 2, -(-cur[3] // 2))
        elif op.kind == "down":
            cur = (2 * cur[0], min(pin.h, 2 * cur[1] + 1), 2 * cur[2], min(pin.w, 2 * cur[3] + 1))
        elif op.kind == "push":
            cur = _union(cur, bstack.pop())
        elif op.kind == "add":
            r = _expand(cur, op.pad, pin.h, pin.w) if op.module is not None else cur
            short[i - start] = r
            bstack.append(r)
        elif op.kind == "attn":
            raise AssertionError("attention inside a tiled segment")
    return cur, bstack, after, short


def _area(r: Region) -> int:
    return (r[1] - r[0]) * (r[3] - r[2])


def _crop(t: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    if want == have:
        return t
    if not (have[0] <= want[0] and want[1] <= have[1] and have[2] <= want[2] and want[3] <= have[3]):
        raise AssertionError(f"tile region {want} not inside {have}")
    return t[:, :, want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2]]


# ------------------------------------------------------------------------------------------------------- plan

@dataclass
class Step:
    kind: str                 # "stats" | "ckpt" | "attn" | "final"
    start: int                # checkpoint op index
    target: int               # op index (state before it) / len(ops) for final
    tile_lat: int             # core tile size in latent px (all passes share the latent grid)
    n_tiles: int
    work_bytes: int           # estimated working set of one tile
    resident_bytes: int       # checkpoints + output alive during the step


@dataclass
class Plan:
    kind: str                 # decoder | encoder
    latent_hw: Tuple[int, int]
    image_hw: Tuple[int, int]
    steps: List[Step]
    budget: int
    tile_px: int              # core tile size of the final pass, image pixels
    fixed_tile: bool
    fast: bool
    elem_bytes: int
    offload: bool = False     # checkpoints live in host RAM (resident_bytes are host bytes then)

    @property
    def total_tiles(self) -> int:
        return sum(s.n_tiles for s in self.steps)

    @property
    def peak_estimate(self) -> int:
        """Peak bytes on the compute device (with offload: output + one tile; checkpoints are in host RAM)."""
        if self.offload:
            out = self.steps[-1].resident_bytes if self.steps else 0
            return max((s.work_bytes for s in self.steps), default=0) + out
        return max((s.work_bytes + s.resident_bytes for s in self.steps), default=0)

    def describe(self) -> str:
        n_ck = sum(1 for s in self.steps if s.kind == "ckpt")
        n_st = sum(1 for s in self.steps if s.kind == "stats")
        mode = "fast (approximate statistics)" if self.fast else "exact"
        return (f"tiled VAE {self.kind}, {mode}: image {self.image_hw[1]}x{self.image_hw[0]} px, tiles of "
                f"{self.tile_px}x{self.tile_px} px ({'set' if self.fixed_tile else 'auto'}), "
                f"{len(self.steps)} passes ({n_ck} checkpoints, {n_st} statistics-only), {self.total_tiles} tile runs, "
                f"est. peak {self.peak_estimate / 2**20:.0f} MiB of a {self.budget / 2**20:.0f} MiB budget"
                + (", checkpoints in host RAM" if self.offload else ""))


def _state_bytes(p: Point, eb: int, batch: int) -> int:
    n = p.c * p.h * p.w + sum(c * h * w for c, h, w in p.stack)
    return n * eb * batch


def _work_bytes(prog: Program, pts: Sequence[Point], start: int, target: int, tile: int, n_lat: Tuple[int, int],
                eb: int, batch: int) -> int:
    """Working set of the biggest tile of a pass (interval arithmetic on the first, usually interior-sized tile)."""
    p = pts[target]
    by = _grid_bounds(n_lat[0], tile, p.h, p.k)
    bx = _grid_bounds(n_lat[1], tile, p.w, p.k)
    # a tile in the middle of the grid has the largest halo on all sides
    core = (*by[len(by) // 2], *bx[len(bx) // 2])
    h0, st0, after, short = _backward(prog, pts, start, target, core)
    best = 0
    live_stack = sum(_area(r) * c for r, (c, _, _) in zip(st0, pts[start].stack))
    for i in range(start, target):
        c_out = pts[i + 1].c
        a = _area(after[i - start]) * c_out
        a_in = _area(after[i - start - 1] if i > start else h0) * pts[i].c
        best = max(best, 2 * a + a_in + live_stack)
        if prog.ops[i].kind == "push":
            live_stack += a_in
    best = max(best, _area(h0) * pts[start].c + live_stack)
    return int(best * eb * batch * 1.25) + (1 << 20)


def _choose_tile(prog, pts, start, target, n_lat, eb, batch, fixed: Optional[int], tile_budget: int) -> int:
    if fixed:
        return max(1, min(fixed, max(n_lat)))
    m = max(n_lat)
    k = 1
    while True:
        t = -(-m // k)
        if t <= 1 or _work_bytes(prog, pts, start, target, t, n_lat, eb, batch) <= tile_budget:
            return max(1, t)
        k += 1


def _n_tiles(pts, target, tile, n_lat) -> int:
    p = pts[target]
    return len(_grid_bounds(n_lat[0], tile, p.h, p.k)) * len(_grid_bounds(n_lat[1], tile, p.w, p.k))


def make_plan(prog: Program, in_shape: Sequence[int], elem_bytes: int, budget: int,
              tile_px: Optional[int] = None, fast: bool = False, known: Optional[Sequence[int]] = None,
              host_budget: Optional[int] = None) -> Plan:
    """Decide checkpoints, statistics passes and tile sizes for an input of ``in_shape`` ([B, C, H, W]).

    ``host_budget``: checkpoints are offloaded to host RAM (CUDA runs) and count against this budget instead of
    the device ``budget``, which then only holds the output and one tile's working set."""
    b, c, h, w = in_shape
    if c != prog.in_channels:
        raise InvalidInputError(f"{prog.kind} expects {prog.in_channels} input channels, got {c}")
    pts = shape_points(prog, c, h, w)
    lat_pt = next(p for p in pts if p.k == 0)
    n_lat = (lat_pt.h, lat_pt.w)
    n_ops = len(prog.ops)
    img = (pts[0].h, pts[0].w) if prog.kind == "encoder" else (pts[-1].h, pts[-1].w)
    fixed = max(1, int(tile_px) // 8) if tile_px else None
    tile_budget = max(budget // 3, 1 << 20)
    out_bytes = _state_bytes(pts[-1], elem_bytes, b)
    known_set = set(known or ())
    steps: List[Step] = []
    ck = 0
    ck_bytes = 0  # the caller's input is not ours to count

    def add(kind: str, target: int, resident: int) -> Step:
        t = _choose_tile(prog, pts, ck, target, n_lat, elem_bytes, b, fixed, tile_budget)
        s = Step(kind, ck, target, t, _n_tiles(pts, target, t, n_lat),
                 _work_bytes(prog, pts, ck, target, t, n_lat, elem_bytes, b), resident)
        steps.append(s)
        return s

    for i, op in enumerate(prog.ops):
        if op.kind == "attn":
            if ck != i:
                nb = _state_bytes(pts[i], elem_bytes, b)
                add("ckpt", i, ck_bytes + nb + out_bytes)
                ck, ck_bytes = i, nb
            nb = _state_bytes(pts[i + 1], elem_bytes, b)
            # the block itself: input + k + v + output at latent scale
            steps.append(Step("attn", i, i + 1, max(n_lat), 0, 2 * pts[i].c * pts[i].h * pts[i].w * elem_bytes * b,
                              ck_bytes + nb + out_bytes))
            ck, ck_bytes = i + 1, nb
            continue
        if op.kind != "gn" or i in known_set or fast:
            continue
        if ck == i:
            continue  # statistics straight off the checkpoint
        nb = _state_bytes(pts[i], elem_bytes, b)
        t = _choose_tile(prog, pts, ck, i, n_lat, elem_bytes, b, fixed, tile_budget)
        work = _work_bytes(prog, pts, ck, i, t, n_lat, elem_bytes, b)
        if host_budget is not None:
            fits = ck_bytes + nb <= host_budget  # the tile's device working set is needed either way
        else:
            fits = ck_bytes + nb + out_bytes + work <= budget
        if fits:
            add("ckpt", i, ck_bytes + nb + out_bytes)
            ck, ck_bytes = i, nb
        else:
            add("stats", i, ck_bytes + out_bytes)
    fin = add("final", n_ops, ck_bytes + out_bytes)
    return Plan(prog.kind, n_lat, img, steps, budget, fin.tile_lat * 8, fixed is not None, fast, elem_bytes,
                host_budget is not None)


# -------------------------------------------------------------------------------------------------- execution

@dataclass
class _Ckpt:
    index: int
    h: torch.Tensor
    stack: List[torch.Tensor] = field(default_factory=list)


@dataclass
class RunOptions:
    """``progress(done, total)``: ``(0, total)`` when a run starts, then after every tile. ``should_stop()``:
    asked after every tile and before every full-image attention pass; True raises :class:`TiledVAEInterrupted`
    (no partial output is returned)."""

    progress: Optional[Callable[[int, int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    max_tiles_per_pass: Optional[int] = None   # benchmarking only: run a bounded sample of each pass (wrong output)
    skip_attention_scores: bool = False        # benchmarking only: allocate k/v/output but skip softmax(QK^T)V
    attn_chunk_bytes: int = 256 << 20
    checkpoint_device: Optional[torch.device] = None  # e.g. cpu: full-size checkpoints offloaded to host RAM


class _Runner:
    def __init__(self, prog: Program, plan: Plan, x: torch.Tensor, affine: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                 opts: RunOptions):
        self.prog, self.plan, self.x, self.opts = prog, plan, x, opts
        self.pts = shape_points(prog, *x.shape[1:])
        self.n_lat = plan.latent_hw
        self.affine = dict(affine)
        self.recorded: Dict[int, GNStats] = {}
        self.done = 0
        # full-size buffers of the checkpoint before last, for the next checkpoint of the same shape: fresh
        # buffers cost a page fault per 4 KiB on first write (the copy into a new checkpoint took 3x the copy
        # into a reused one), and a checkpoint's shape repeats through each resolution level
        self._pool: List[torch.Tensor] = []

    # -- one tile -------------------------------------------------------------------------------------------
    def _tile(self, ck: _Ckpt, target: int, core: Region):
        prog, pts = self.prog, self.pts
        h0, st0, after, short = _backward(prog, pts, ck.index, target, core)
        pfull = pts[ck.index]
        have = (0, pfull.h, 0, pfull.w)
        dev = self.x.device
        h = _crop(ck.h, have, h0).to(dev, non_blocking=True)
        reg = h0
        stack = [(_crop(t, (0, p[1], 0, p[2]), r).to(dev, non_blocking=True), r)
                 for t, p, r in zip(ck.stack, pfull.stack, st0)]
        for i in range(ck.index, target):
            op = prog.ops[i]
            want = after[i - ck.index]
            k = op.kind
            if k == "conv":
                h = op.module(h)
            elif k == "gn":
                sc, sh = self.affine[i]
                h = group_norm_apply(h, sc, sh, op.silu)
            elif k == "silu":
                h = F.silu(h)
            elif k == "tanh":
                h = torch.tanh(h)
            elif k == "up":
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                reg = (reg[0] * 2, reg[1] * 2, reg[2] * 2, reg[3] * 2)
            elif k == "down":
                h = op.module(F.pad(h, (0, 1, 0, 1)))
                reg = (reg[0] // 2, reg[0] // 2 + h.shape[2], reg[2] // 2, reg[2] // 2 + h.shape[3])
            elif k == "push":
                stack.append((h, reg))
                continue
            elif k == "add":
                r, rreg = stack.pop()
                if op.module is not None:
                    rin = short[i - ck.index]
                    r = _crop(op.module(_crop(r, rreg, rin)), rin, reg)
                else:
                    r = _crop(r, rreg, reg)
                h = r + h
                if op.div != 1.0:
                    h = h / op.div
            else:
                raise AssertionError(k)
            h = _crop(h, reg, want)
            reg = want
        return h, reg, stack

    def _tiles(self, step: Step) -> List[Region]:
        p = self.pts[step.target]
        by = _grid_bounds(self.n_lat[0], step.tile_lat, p.h, p.k)
        bx = _grid_bounds(self.n_lat[1], step.tile_lat, p.w, p.k)
        cores = [(y0, y1, x0, x1) for (y0, y1) in by for (x0, x1) in bx]
        if self.opts.max_tiles_per_pass:
            cores = cores[: self.opts.max_tiles_per_pass]
        return cores

    def _tick(self) -> None:
        self.done += 1
        if self.opts.progress:
            self.opts.progress(self.done, self.plan.total_tiles)
        self._check_stop()

    def _check_stop(self) -> None:
        if self.opts.should_stop is not None and self.opts.should_stop():
            raise TiledVAEInterrupted(f"tiled {self.prog.kind} interrupted after {self.done} of "
                                      f"{self.plan.total_tiles} tiles")

    def _set_stats(self, i: int, st: GNStats) -> None:
        op = self.prog.ops[i]
        if not st.finite():
            raise NonFiniteError(f"NaN/inf in the input of {op.name} ({self.x.dtype}); the SDXL VAE overflows "
                                 "float16: run the VAE in float32 (WebUI: --no-half-vae) or use an fp16-fix VAE")
        self.recorded[i] = st
        self.affine[i] = norm_affine(st, op.module.weight, op.module.bias, op.module.eps, self.pts[i].c)

    # -- passes --------------------------------------------------------------------------------------------
    def _stats_pass(self, ck: _Ckpt, step: Step) -> None:
        op = self.prog.ops[step.target]
        parts = []
        for core in self._tiles(step):
            h, reg, _ = self._tile(ck, step.target, core)
            parts.append(group_stats(h, op.groups, (core[0] - reg[0], core[1] - reg[0], core[2] - reg[2],
                                                    core[3] - reg[2])))
            del h
            self._tick()
        self._set_stats(step.target, merge_all(parts))

    def _materialise(self, ck: _Ckpt, step: Step) -> _Ckpt:
        p = self.pts[step.target]
        cores = self._tiles(step)
        cdev = self.opts.checkpoint_device or self.x.device
        op = self.prog.ops[step.target] if step.target < len(self.prog.ops) else None
        want_stats = op is not None and op.kind == "gn" and step.target not in self.affine
        if len(cores) == 1 and cores[0] == (0, p.h, 0, p.w) and not self.opts.max_tiles_per_pass:
            h, _, stack = self._tile(ck, step.target, cores[0])
            if want_stats:
                self._set_stats(step.target, group_stats(h, op.groups))
            self._tick()
            return _Ckpt(step.target, h.to(cdev), [t.to(cdev) for t, _ in stack])
        b = self.x.shape[0]
        dt = self._dtype
        pin = cdev.type == "cpu" and self.x.is_cuda
        keep = self._untouched(ck.index, step.target)
        # the state before a GroupNorm that directly follows a push (a ResNet block's norm1): the pending
        # residual *is* the activation, so the two share one buffer (nothing writes into a checkpoint in place)
        share = step.target > ck.index and self.prog.ops[step.target - 1].kind == "push" and len(p.stack) > keep
        take = self._take_pool
        full = take((b, p.c, p.h, p.w), cdev, dt, pin)
        fstack = list(ck.stack[:keep])  # residuals no op of this segment pops: the same tensors, not copies
        for j, (c, hh, ww) in enumerate(p.stack[keep:], keep):
            if share and j == len(p.stack) - 1:
                fstack.append(full)
            else:
                fstack.append(take((b, c, hh, ww), cdev, dt, pin))
        self._pool.clear()  # buffers of other shapes: freed before the tiles run, as without the pool
        if self.opts.max_tiles_per_pass:  # touch the pages so a bounded run measures real memory
            full.zero_()
            for t in fstack[keep:]:
                t.zero_()
        parts = []
        for core in cores:
            h, reg, stack = self._tile(ck, step.target, core)
            src = (core[0] - reg[0], core[1] - reg[0], core[2] - reg[2], core[3] - reg[2])
            if want_stats:  # statistics of the cores while they are on the compute device: no second read
                parts.append(group_stats(h, op.groups, src))
            write_tile(full, h, core, src)
            for j in range(keep, len(fstack)):
                if fstack[j] is full:
                    continue
                t, treg = stack[j]
                write_tile(fstack[j], t, core, (core[0] - treg[0], core[1] - treg[0], core[2] - treg[2],
                                                core[3] - treg[2]))
            del h, stack
            self._tick()
        if want_stats:
            self._set_stats(step.target, merge_all(parts))
        return _Ckpt(step.target, full, fstack)

    def _untouched(self, start: int, target: int) -> int:
        """How many residuals at the bottom of the stack no op in ``start..target-1`` pops (they are the same
        tensors before and after the segment)."""
        depth = low = len(self.pts[start].stack)
        for i in range(start, target):
            k = self.prog.ops[i].kind
            if k == "push":
                depth += 1
            elif k == "add":
                depth -= 1
                low = min(low, depth)
        return low

    def _take_pool(self, shape, dev: torch.device, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        for j, t in enumerate(self._pool):
            if tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == dev:
                return self._pool.pop(j)
        return torch.empty(shape, device=dev, dtype=dtype, pin_memory=pin)

    def _release(self, old: _Ckpt, new: _Ckpt) -> None:
        """Put the buffers of ``old`` that ``new`` does not hold (and that are not the caller's input) in the pool."""
        live = [new.h, *new.stack, self.x]
        seen: List[torch.Tensor] = []
        for t in [old.h, *old.stack]:
            if any(t is u for u in live) or any(t is u for u in seen) or not t.is_contiguous() \
                    or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                continue
            seen.append(t)
        self._pool = seen

    def _attn(self, ck: _Ckpt, i: int) -> _Ckpt:
        op = self.prog.ops[i]
        out = global_attention(op.attn, ck.h.to(self.x.device), self.opts.attn_chunk_bytes,
                               self.opts.skip_attention_scores)
        return _Ckpt(i + 1, out.to(ck.h.device), ck.stack)

    def _final(self, ck: _Ckpt, step: Step) -> torch.Tensor:
        p = self.pts[-1]
        out = None
        for core in self._tiles(step):
            h, reg, _ = self._tile(ck, step.target, core)
            if out is None:
                if core == (0, p.h, 0, p.w):
                    self._tick()
                    return h
                out = torch.zeros(self.x.shape[0], p.c, p.h, p.w, device=h.device, dtype=h.dtype)
            write_tile(out, h, core, (core[0] - reg[0], core[1] - reg[0], core[2] - reg[2], core[3] - reg[2]))
            del h
            self._tick()
        return out

    def run(self) -> torch.Tensor:
        self._dtype = self.x.dtype
        ck = _Ckpt(0, self.x, [])
        if self.opts.progress:
            self.opts.progress(0, self.plan.total_tiles)
        for step in self.plan.steps:
            if step.kind != "ckpt":
                self._pool.clear()  # only a checkpoint pass reuses buffers; the others get the memory back
            if step.kind == "attn":
                self._check_stop()
                ck = self._attn(ck, step.start)
            elif step.kind == "stats":
                self._stats_pass(ck, step)
                continue
            elif step.kind == "ckpt":
                new = self._materialise(ck, step)
                self._release(ck, new)
                ck = new
            elif step.kind == "final":
                missing = [i for i, o in enumerate(self.prog.ops) if o.kind == "gn" and i not in self.affine]
                if missing:
                    raise AssertionError(f"GroupNorm statistics missing for ops {missing}")
                return self._final(ck, step)
            # a GroupNorm right at a checkpoint: its statistics come straight off the full tensor
            if ck.index < len(self.prog.ops):
                op = self.prog.ops[ck.index]
                if op.kind == "gn" and ck.index not in self.affine:
                    self._set_stats(ck.index, full_group_stats(ck.h, op.groups))
        raise AssertionError("plan without a final step")


def global_attention(p: AttnParams, x: torch.Tensor, chunk_bytes: int = 256 << 20,
                     skip_scores: bool = False) -> torch.Tensor:
    """The VAE's self-attention block on the whole tensor: exact GroupNorm statistics, keys/values for every
    position, queries in chunks (so the score matrix never exceeds ``chunk_bytes``), residual add."""
    b, c, h, w = x.shape
    n = h * w
    norm = p.norm
    st = full_group_stats(x, int(norm.num_groups))
    if not st.finite():
        raise NonFiniteError(f"NaN/inf in the attention input ({x.dtype}); run the VAE in float32")
    sc, sh = norm_affine(st, norm.weight, norm.bias, norm.eps, c)
    heads = p.heads
    d = c // heads
    rows = max(1, (4 << 20) // max(1, b * c * w * 4))
    ks, vs = [], []
    for y in range(0, h, rows):
        t = group_norm_apply(x[:, :, y:y + rows], sc, sh, False).flatten(2).transpose(1, 2)  # [B, n, C]
        ks.append(F.linear(t, p.wk, p.bk))
        vs.append(F.linear(t, p.wv, p.bv))
    k = torch.cat(ks, 1).reshape(b, n, heads, d).transpose(1, 2)
    v = torch.cat(vs, 1).reshape(b, n, heads, d).transpose(1, 2)
    del ks, vs
    out = torch.empty_like(x)
    if skip_scores:  # bounded benchmark run: memory of k, v and the output, none of the O(N^2) compute
        out.copy_(x)
        return out
    q_rows = max(1, min(h, chunk_bytes // max(1, b * heads * n * 4 * w)))
    for y in range(0, h, q_rows):
        xc = x[:, :, y:y + q_rows]
        rr = xc.shape[2]
        t = group_norm_apply(xc, sc, sh, False).flatten(2).transpose(1, 2)
        q = F.linear(t, p.wq, p.bq).reshape(b, rr * w, heads, d).transpose(1, 2)
        try:
            a = F.scaled_dot_product_attention(q, k, v, scale=p.scale)
        except TypeError:  # torch < 2.1: no scale argument
            a = F.scaled_dot_product_attention(q * (p.scale * math.sqrt(d)), k, v)
        a = a.transpose(1, 2).reshape(b, rr * w, c)
        o = F.linear(a, p.wo, p.bo).transpose(1, 2).reshape(b, c, rr, w)
        if p.residual:
            o = o + xc
        if p.rescale != 1.0:
            o = o / p.rescale
        out[:, :, y:y + rr] = o
    return out


def run_plan(prog: Program, plan: Plan, x: torch.Tensor,
             affine: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None,
             opts: Optional[RunOptions] = None) -> Tuple[torch.Tensor, Dict[int, GNStats]]:
    """Execute ``plan``; returns the output and the statistics it gathered (by op index)."""
    r = _Runner(prog, plan, x, affine or {}, opts or RunOptions())
    with torch.no_grad():
        out = r.run()
    return out, r.recorded
