"""Write full-size SD1.5 / SDXL checkpoints with random weights (real key layout, real shapes), streaming.

    python bench/make_models.py [--out DIR] [--arch sd1,sdxl] [--dtype fp16|fp32|bf16] [--seed 0] [--overwrite]

Each tensor is generated from (seed, key) and written straight into the file by the streaming safetensors writer, so
peak memory is about one tensor (the largest is CLIP's token embedding) plus the interpreter, not a model. Prints,
per file: keys, size, seconds, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lib_sdtoolkit.samples import factory  # noqa: E402

ARCHS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL-refiner", "vae": "VAE"}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/models", help="output folder (default: bench/models)")
    ap.add_argument("--arch", default="sd1,sdxl", help=f"comma-separated: {', '.join(ARCHS)}")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rss0 = peak_rss_mb()
    for name in [a.strip() for a in args.arch.split(",") if a.strip()]:
        if name not in ARCHS:
            ap.error(f"unknown arch {name!r}; one of {', '.join(ARCHS)}")
        path = out / f"{name}-full-{args.dtype}.safetensors"
        t = time.perf_counter()
        factory.write_checkpoint(path, ARCHS[name], width="full", dtype=DTYPES[args.dtype], seed=args.seed,
                                 metadata={"sdtoolkit_random_weights": "1", "seed": str(args.seed)},
                                 overwrite=args.overwrite)
        dt = time.perf_counter() - t
        n = len(factory.key_specs(ARCHS[name], "full"))
        print(f"{path}: {n} keys, {path.stat().st_size / 1e9:.2f} GB, {dt:.1f} s, "
              f"peak RSS {peak_rss_mb():.0f} MB (after imports {rss0:.0f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
