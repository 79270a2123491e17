"""ControlNet hook overhead: per-step time of a full-width SD1.5 UNet alone, with one and with two units.

    python bench/controlnet_bench.py [--size tiny|mid|full] [--rounds 3] [--latent 64] [--width tiny|full]
                                     [--threads N]   (loaded machine: --threads 1)

CPU, fp32, random weights (timing does not depend on the values), batch 1, 64x64 latents (512x512 images).
The four cases (UNet alone, ControlNet forward alone, UNet + 1 unit, UNet + 2 units) run interleaved, one of each
per round (the order rotating each round), so load drifting on a shared machine hits them alike; each case's output
is compared with its warm-up's in every round (the same work each time; max |d| printed, with how far the units move
the UNet's output), and the load average is printed per round. Each call is timed twice: process CPU time (all
threads; barely moved by other processes taking cores, the figure the ratios use) and wall time; the printout keeps
per case the minimum over the rounds, the run_all row the median [min-max] of the per-round ratios. On a loaded machine prefer ``--threads 1``: idle-spinning worker threads of a
descheduled peer are what inflates CPU time. Hook overhead = (hooked step - UNet alone - k ControlNet
forwards) / (k ControlNet forwards). Target: <= 5 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from lib_sdtoolkit.controlnet.cldm import ControlNet  # noqa: E402
from lib_sdtoolkit.controlnet.hook import HookUnit, UnetHook  # noqa: E402
from lib_sdtoolkit.controlnet.models import ControlModel  # noqa: E402
from lib_sdtoolkit.samples import factory  # noqa: E402


def _first(out):
    """The tensor to compare of a case's output (the ControlNet forward returns its list of residuals)."""
    return out[-1] if isinstance(out, (list, tuple)) else out


def run_rounds(cases, rounds):
    """Warm each case up once (its output kept as the reference), then time ``rounds`` rounds of one call per case
    -> ({name: [cpu s]}, {name: [wall s]}, [load per round], {name: max |output - warm-up output| over the rounds},
    {name: warm-up output}): every round must do the very same work, so its output must equal the warm-up's."""
    ref = {name: _first(fn()) for name, fn in cases.items()}
    cpu = {name: [] for name in cases}
    wall = {name: [] for name in cases}
    drift = {name: 0.0 for name in cases}
    names = list(cases)
    loads = []
    for r in range(rounds):
        loads.append(C.load1())
        for name in names[r % len(names):] + names[:r % len(names)]:  # the order rotates each round
            fn = cases[name]
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            drift[name] = max(drift[name], float((_first(out) - ref[name]).abs().max()))
    print(f"load average at each round: {', '.join(f'{x:.2f}' for x in loads)}", flush=True)
    return cpu, wall, loads, drift, ref


class _CachedOutputs:
    """A ControlModel stand-in returning precomputed residuals at no cost: timing the hook with it measures only
    the hook's own work (hint lookup, scaling, summing units) -- the part the overhead target is about."""

    def __init__(self, outs):
        self.outs, self.dtype, self.device, self.name = outs, outs[0].dtype, outs[0].device, "cached"

    def __call__(self, x, hint, t, ctx, y=None):
        return self.outs


def hook_arithmetic(n: int, repeats: int = 20) -> dict:
    """Min seconds of the hook's own work per step for 1 and 2 units with SD1.5's 13 residual shapes at n x n
    latents: ``compute_control`` with free model outputs, plus the 13 injection additions in the forward."""
    shapes = [(320, n)] * 4 + [(640, n // 2)] * 3 + [(1280, n // 4)] * 3 + [(1280, n // 8)] * 3
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(1, c, s, s, generator=g) for c, s in shapes]
    x, t, ctx = torch.randn(1, 4, n, n), torch.tensor([500.0]), torch.randn(1, 77, 768)
    hint = torch.rand(1, 3, n * 8, n * 8)
    res = {}
    for k in (1, 2):
        hook = UnetHook([HookUnit(_CachedOutputs(outs), hint) for _ in range(k)])

        def step():
            ctrl = hook.compute_control(x, t, ctx)
            return [o + c for o, c in zip(outs, ctrl)]  # stands for the h + control additions in the UNet
        step()
        ts = []
        for _ in range(repeats):
            t0 = time.process_time()
            step()
            ts.append(time.process_time() - t0)
        res[k] = min(ts)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=None, help="same as --rounds")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default by --size: 16, 32, 64)")
    ap.add_argument("--width", default=None, choices=["tiny", "full"], help="UNet width (default by --size)")
    C.size_arg(ap)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cn-seconds", type=float, default=0.0,
                    help="with --hook-only: a measured ControlNet forward time to express the hook's work against")
    ap.add_argument("--hook-only", action="store_true", help="only the hook's own arithmetic (no full models)")
    args = ap.parse_args()
    args.repeats = args.repeats or args.rounds
    args.latent = args.latent or {"tiny": 16, "mid": 32, "full": 64}[args.size]
    width = args.width or ("tiny" if args.size == "tiny" else "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hook_only:
        with torch.no_grad():
            ha = hook_arithmetic(args.latent)
        for k, v in ha.items():
            rel = f" = {v / (k * args.cn_seconds) * 100:.2f}% of {k} ControlNet forward(s)" if args.cn_seconds else ""
            print(f"hook's own work, {k} unit(s): {v * 1000:.1f} ms CPU per step{rel}")
        return 0
    cfg = factory.get_config("SD1", width)
    unet = factory.build_ldm_unet("SD1", width)
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    cn = ControlNet(hint_channels=3, **kw).eval()
    gz = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained models have no zero-initialised layers (ldm's zero_module: the UNet's out conv,
        for mod in (unet, cn):  # the ControlNet's zero convs): give them values, so that the units change the
            for p in mod.parameters():  # UNet's output and the output check below means something
                if p.dim() > 1 and not bool(p.any()):
                    p.copy_(torch.randn(p.shape, generator=gz) * 0.02)
    model = ControlModel(cn, "SD1", "ldm", "bench", kw["context_dim"], kw["model_channels"])
    g = torch.Generator().manual_seed(0)
    n = args.latent
    x = torch.randn(1, 4, n, n, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, kw["context_dim"], generator=g)
    hint = torch.rand(1, 3, n * 8, n * 8, generator=g)

    hooks = {k: UnetHook([HookUnit(model, hint, weight=1.0) for _ in range(k)]) for k in (1, 2)}

    def hooked(k):
        with hooks[k].hook(unet):
            return unet(x, t, ctx)

    cases = {"unet": lambda: unet(x, t, ctx), "cn": lambda: model(x, hint, t, ctx),
             1: lambda: hooked(1), 2: lambda: hooked(2)}
    with torch.no_grad():
        cpu, wall, loads, drift, ref = run_rounds(cases, args.repeats)
    best = {k: min(v) for k, v in cpu.items()}
    bw = {k: min(v) for k, v in wall.items()}
    t_unet, t_cn = best["unet"], best["cn"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, latent {n}x{n}, batch 1, fp32 CPU, "
          f"{args.repeats} interleaved rounds; min process-CPU s (min wall s)")
    print(f"UNet alone            {t_unet:8.3f} s/step  ({bw['unet']:.3f})")
    print(f"ControlNet forward    {t_cn:8.3f} s       ({bw['cn']:.3f})")
    for k in (1, 2):
        overhead = (best[k] - t_unet - k * t_cn) / (k * t_cn)
        wo = (bw[k] - bw["unet"] - k * bw["cn"]) / (k * bw["cn"])
        print(f"UNet + {k} unit(s)      {best[k]:8.3f} s/step  ({bw[k]:.3f})   x{best[k] / t_unet:.3f} vs UNet alone;"
              f"   hook overhead {overhead * 100:+.1f}% of the ControlNet forwards (wall {wo * 100:+.1f}%)")
    with torch.no_grad():
        ha = hook_arithmetic(n)
    for k, v in ha.items():
        print(f"hook's own work, {k} unit(s): {v * 1000:.1f} ms CPU per step = {v / (k * t_cn) * 100:.2f}% of the "
              "ControlNet forwards (measured directly, with free model outputs)")
    rows = []
    effect = {k: float((ref[k] - ref["unet"]).abs().max()) for k in (1, 2)}
    check = ("same inputs on every case; each case's output equal to its warm-up in every round (max |d| "
             + ", ".join(f"{k}: {v:.2g}" for k, v in drift.items())
             + f"); the units change the UNet's output (max |d| vs UNet alone: 1 unit {effect[1]:.2g}, "
             f"2 units {effect[2]:.2g})")
    print("check:", check)
    cmd = f"python bench/controlnet_bench.py --width {width} --latent {n} --rounds {args.repeats}"
    for k in (1, 2):
        # per round: hooked step / (UNet alone + k ControlNet forwards), process CPU seconds
        rs = [h / (u + k * c) for h, u, c in zip(cpu[k], cpu["unet"], cpu["cn"])]
        m = C.med_min_max(rs)
        rows.append(C.Row(f"controlnet {width} latent {n}", f"UNet + {k} unit(s) vs UNet + {k} ControlNet forward(s), "
                          "process CPU", f"{C.fmt_mmm(cpu[k])}", f"{C.fmt_mmm([u + k * c for u, c in zip(cpu['unet'], cpu['cn'])])}",
                          C.fmt_ratio(rs), check, "in RAM", cmd,
                          f"hook overhead <= 5%: {'met' if m[0] <= 1.05 else 'missed'} (median {100 * (m[0] - 1):+.1f}%)",
                          ", ".join(f"{x:.1f}" for x in loads)))
    C.emit_rows(rows, args.rows)
    print("raw cpu s per round:", {str(k): [round(v, 2) for v in vs] for k, vs in cpu.items()})
    print("raw wall s per round:", {str(k): [round(v, 2) for v in vs] for k, vs in wall.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
