"""Full SVD vs the randomised SVD ``lora extract`` uses for large layers, on every SD1.5 layer it extracts.

For each layer ``lora extract --conv-rank R`` would extract from a full-width SD1.5 (shapes from the shipped SD1
layout: attention, feed-forward, proj_in/out, text-encoder attention/MLP, ResNet and sampler convs), a synthetic
difference with a fine-tune's kind of spectrum (singular values ∝ i^-p with random singular vectors) is truncated
at the rank both ways (``lowrank.truncated(..., mode="full" | "randomized")``), alternating the order. Printed per
distinct shape: seconds each way and the error ratio ‖ΔW − approx‖_rand / ‖ΔW − approx‖_full (1 = optimal), then
the totals over every layer (a shape's time times its count), the speed-up and the largest error ratio.

    python bench/lora_svd_bench.py --rank 32 --threads 2 [--power 0.5] [--conv] [--min-rows N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def layer_shapes(conv: bool):
    from lib_sdtoolkit.arch import keymaps
    from lib_sdtoolkit.lora.extract import _is_attention, _targets

    layout = keymaps.load_layout("SD1")
    out = []
    for _, t in _targets("SD1"):
        s = layout.get(t.weight_key)
        if s is None or len(s) < 2:
            continue
        s = tuple(s)
        if t.qkv_index is not None:
            s = (s[0] // 3, *s[1:])
        if not _is_attention(t.module) and not conv:
            continue
        out.append((s[0], int(__import__("math").prod(s[1:]))))
    return Counter(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--power", type=float, default=0.5, help="singular values ∝ i^-power")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conv", action="store_true", help="also the ResNet/sampler layers (--conv-rank)")
    ap.add_argument("--min-rows", type=int, default=0, help="only the shapes with at least this many rows")
    a = ap.parse_args()
    import torch

    from lib_sdtoolkit.lora import lowrank

    torch.set_num_threads(a.threads)
    shapes = layer_shapes(a.conv)
    print(f"SD1.5 layers: {sum(shapes.values())} in {len(shapes)} shapes; rank {a.rank}; spectrum i^-{a.power}; "
          f"{a.threads} threads; load {os.getloadavg()[0]:.2f}")
    print(f"{'shape':>14} {'n':>4} {'full s':>8} {'rand s':>8} {'speed-up':>8} {'err ratio':>10}")
    tot_full = tot_rand = 0.0
    worst = 1.0
    g = torch.Generator().manual_seed(0)
    for (m, n), count in sorted(shapes.items()):
        if m < a.min_rows:
            continue
        k = min(m, n)
        u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
        s = torch.arange(1, k + 1, dtype=torch.float32) ** -a.power
        d = (u * s) @ v.T
        times = {}
        res = {}
        for mode in (("full", "randomized") if (m + n) % 2 else ("randomized", "full")):
            t0 = time.perf_counter()
            tr = lowrank.truncated(d, a.rank, mode=mode)
            times[mode] = time.perf_counter() - t0
            res[mode] = float((d - tr.up @ tr.down).double().norm())
        ratio = res["randomized"] / res["full"]
        worst = max(worst, ratio)
        tot_full += times["full"] * count
        tot_rand += times["randomized"] * count
        print(f"{m:>6}x{n:<7} {count:>4} {times['full']:>8.3f} {times['randomized']:>8.3f} "
              f"{times['full'] / times['randomized']:>7.1f}x {ratio:>10.5f}")
    print(f"total over every layer: full {tot_full:.1f} s, randomized {tot_rand:.1f} s, "
          f"speed-up {tot_full / tot_rand:.1f}x; largest error ratio {worst:.5f} (1 = the full SVD's error)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
