"""ControlNet hook overhead: per-step time of a full-width SD1.5 UNet alone, with one and with two units.

    python bench/controlnet_bench.py [--repeats 3] [--latent 64] [--threads N]

CPU, fp32, random weights (timing does not depend on the values), batch 1, 64x64 latents (512x512 images).
Prints the median step times and the hook overhead: (hooked step - UNet alone - ControlNet forwards alone) divided
by the ControlNet forwards alone. Target: <= 5 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_sdtoolkit.controlnet.cldm import ControlNet  # noqa: E402
from lib_sdtoolkit.controlnet.hook import HookUnit, UnetHook  # noqa: E402
from lib_sdtoolkit.controlnet.models import ControlModel  # noqa: E402
from lib_sdtoolkit.samples import factory  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = factory.get_config("SD1", "full")
    unet = factory.build_ldm_unet("SD1", "full")
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    cn = ControlNet(hint_channels=3, **kw).eval()
    model = ControlModel(cn, "SD1", "ldm", "bench", kw["context_dim"], kw["model_channels"])
    g = torch.Generator().manual_seed(0)
    n = args.latent
    x = torch.randn(1, 4, n, n, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, kw["context_dim"], generator=g)
    hint = torch.rand(1, 3, n * 8, n * 8, generator=g)

    with torch.no_grad():
        t_unet = timed(lambda: unet(x, t, ctx), args.repeats)
        t_cn = timed(lambda: model(x, hint, t, ctx), args.repeats)
        res = {}
        for k in (1, 2):
            units = [HookUnit(model, hint, weight=1.0) for _ in range(k)]
            with UnetHook(units).hook(unet):
                res[k] = timed(lambda: unet(x, t, ctx), args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, latent {n}x{n}, batch 1, fp32 CPU")
    print(f"UNet alone            {t_unet:8.3f} s/step")
    print(f"ControlNet forward    {t_cn:8.3f} s")
    for k in (1, 2):
        overhead = (res[k] - t_unet - k * t_cn) / (k * t_cn)
        print(f"UNet + {k} unit(s)      {res[k]:8.3f} s/step   x{res[k] / t_unet:.3f} vs UNet alone;"
              f"   hook overhead {overhead * 100:+.1f}% of the ControlNet forwards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
