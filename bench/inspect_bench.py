"""How fast and how lean is `inspect` on a full-size SD1.5 checkpoint?

    python bench/inspect_bench.py [--file PATH]      (without --file a full-size SD1.5 fp16 file is generated)

Each measurement runs in its own process so peak RSS is its own. Printed: wall time and peak RSS above the
process's baseline (torch imported; the peak is reset through /proc/self/clear_refs) for (a) our header read + detection + report, (b) the naive way that
loads the whole state dict (``safetensors.torch.load_file``), and their ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
import torch  # baseline: the interpreter with torch loaded
import lib_sdtoolkit.inspect as insp
from safetensors.torch import load_file

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

path, mode = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
base = status_mb("VmRSS")
t = time.perf_counter()
if mode == "ours":
    rep = insp.inspect_file(path)
    what = rep["architecture"] + " " + str(rep["total_keys"]) + " keys"
else:
    sd = {k: v.clone() for k, v in load_file(path).items()}  # materialised, as a load-everything tool holds it
    what = str(len(sd)) + " keys"
dt = time.perf_counter() - t
peak = status_mb("VmHWM")
print(json.dumps({"seconds": dt, "peak_above_base_mb": peak - base, "what": what}))
"""


def run(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(ROOT)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path)
    args = ap.parse_args()
    tmp = None
    path = args.file
    if path is None:
        sys.path.insert(0, str(ROOT))
        import torch

        from lib_sdtoolkit.samples import factory

        tmp = tempfile.TemporaryDirectory(dir=os.environ.get("SDTOOLKIT_BENCH_DIR"))
        path = Path(tmp.name) / "sd15-full.safetensors"
        t = time.perf_counter()
        factory.write_checkpoint(path, "SD1", width="full", dtype=torch.float16)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    try:
        # drop the file from the page cache question: run the naive load first so both see a warm cache
        naive = run(path, "naive")
        ours = run(path, "ours")
        print(f"ours  (header + detect + report): {ours['seconds'] * 1000:8.1f} ms, "
              f"peak RSS +{ours['peak_above_base_mb']:7.1f} MB  [{ours['what']}]")
        print(f"naive (load_file, whole model):   {naive['seconds'] * 1000:8.1f} ms, "
              f"peak RSS +{naive['peak_above_base_mb']:7.1f} MB  [{naive['what']}]")
        print(f"ratio ours/naive: time {ours['seconds'] / naive['seconds']:.3f}x, "
              f"memory {max(ours['peak_above_base_mb'], 0.1) / max(naive['peak_above_base_mb'], 0.1):.3f}x")
        ok = ours["seconds"] < 1.0 and ours["peak_above_base_mb"] < 100
        print(f"target (< 1 s, < 100 MB): {'met' if ok else 'NOT met'}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
