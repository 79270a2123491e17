"""Merge benchmark: ours vs sd-mecha vs a naive load-everything merge vs the I/O floor.

    python bench/merge_bench.py [--dir bench/models_merge] [--sdxl] [--skip-mecha] [--skip-naive] [--keep]

Writes two full-size SD1.5 fp16 checkpoints (random weights, real keys and shapes, streamed by
``lib_sdtoolkit.samples.factory``), then runs each contender in its own process (so peak RSS is its own) on the same
files, weighted sum M=0.5 to fp16:

* ours: ``lib_sdtoolkit.merge.merge_files`` (default options: input sha256s recorded in the metadata);
* sd-mecha: ``sd_mecha.merge(sd_mecha.weighted_sum(model(A), model(B), alpha=0.5), output=..., output_dtype=fp16)``;
* naive: the WebUI's way: ``safetensors.torch.load_file`` both, per key ``A*(1-M) + B*M`` in fp32, save;
* I/O floor: read both inputs and write (and fsync) an output-sized file, nothing else.

Prints wall time (measured in the child, after imports) and peak RSS (``VmHWM`` of the child) for each, and the
ratios. ``--sdxl`` also writes two full-size SDXL files and prints our peak RSS on them. The machine's cores are
shared, so figures are noisy: compare ratios from the same run. Big files are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALPHA = 0.5


def _rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` (per address space, reset by exec) rather than ``ru_maxrss``, which Linux
    carries over from the parent across fork + exec and would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, a: str, b: str, out: str) -> dict:
    import torch

    t0 = time.perf_counter()
    if mode == "ours":
        from lib_sdtoolkit.merge import MergeRecipe, merge_files

        merge_files(MergeRecipe(a, b, alpha=ALPHA), out)
    elif mode == "mecha":
        import sd_mecha

        recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=ALPHA)
        sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, merge_dtype=torch.float32)
    elif mode == "naive":
        from safetensors.torch import load_file, save_file

        theta_1 = load_file(b)
        theta_0 = load_file(a)
        for k in list(theta_0):
            if k in theta_1 and theta_0[k].is_floating_point() and not k.endswith("position_ids"):
                theta_0[k] = (theta_0[k].float() * (1 - ALPHA) + theta_1[k].float() * ALPHA).half()
        del theta_1
        save_file(theta_0, out)
    elif mode == "io":
        buf = bytearray(16 << 20)
        mv = memoryview(buf)
        for p in (a, b):
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        size = os.path.getsize(a)
        with open(out, "wb", buffering=0) as fh:
            left = size
            while left:
                n = fh.write(mv[: min(len(buf), left)])
                left -= n
            os.fsync(fh.fileno())
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"mode": mode, "seconds": time.perf_counter() - t0, "peak_rss_mb": _rss_mb()}


def run_child(mode: str, a: Path, b: Path, out: Path) -> dict:
    if out.exists():
        out.unlink()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(a), str(b), str(out)],
                          capture_output=True, text=True)
    if out.exists():
        out.unlink()
    if proc.returncode != 0:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make(path: Path, arch: str, seed: int) -> None:
    import torch

    from lib_sdtoolkit.samples import factory

    if not path.exists():
        t = time.perf_counter()
        factory.write_checkpoint(path, arch, width="full", dtype=torch.float16, seed=seed)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(ROOT / "bench" / "models_merge"))
    ap.add_argument("--sdxl", action="store_true", help="also measure our peak RSS on full-size SDXL")
    ap.add_argument("--skip-mecha", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    a, b, out = d / "sd15_a.safetensors", d / "sd15_b.safetensors", d / "out.safetensors"
    made = [a, b]
    try:
        make(a, "SD1", 0)
        make(b, "SD1", 1)
        modes = ["io", "ours"] + ([] if args.skip_naive else ["naive"]) + ([] if args.skip_mecha else ["mecha"])
        res = {}
        for m in modes:
            res[m] = r = run_child(m, a, b, out)
            if "error" in r:
                print(f"{m:6s} failed: {r['error']}", flush=True)
            else:
                print(f"{m:6s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:8.0f} MB", flush=True)
        ours = res.get("ours", {})
        if "seconds" in ours:
            print("ratios (ours / other):")
            for m in ("io", "naive", "mecha"):
                o = res.get(m, {})
                if "seconds" in o:
                    print(f"  vs {m:6s} time {ours['seconds'] / o['seconds']:.2f}x   "
                          f"peak RSS {ours['peak_rss_mb'] / o['peak_rss_mb']:.2f}x")
            print(f"targets: time <= 2x I/O floor: {'OK' if ours['seconds'] <= 2 * res['io']['seconds'] else 'MISSED'};"
                  f" peak RSS <= 512 MB: {'OK' if ours['peak_rss_mb'] <= 512 else 'MISSED'}")
        if args.sdxl:
            xa, xb = d / "sdxl_a.safetensors", d / "sdxl_b.safetensors"
            made += [xa, xb]
            make(xa, "SDXL", 0)
            make(xb, "SDXL", 1)
            r = run_child("ours", xa, xb, out)
            if "error" in r:
                print(f"SDXL ours failed: {r['error']}")
            else:
                print(f"SDXL ours {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:8.0f} MB "
                      f"(target <= 1024 MB: {'OK' if r['peak_rss_mb'] <= 1024 else 'MISSED'})")
    finally:
        if not args.keep:
            for p in made:
                if p.exists():
                    p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
