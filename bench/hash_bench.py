"""Hash benchmark (issue 4), all ratios measured in this one run on this machine.

1. Our sha256 of a 2 GB file vs ``sha256sum`` (coreutils) on the same file, both with the file in the page cache
   (one warm-up read first), best of N runs each. Target: ours >= 0.95x its speed.
2. All five hashes in one pass vs sha256 alone (ours). Target: <= 1.3x the time. AutoV3 is a second sha256 over the
   data, so this needs a second free core.
3. A second dedup scan of a folder of 100 small model files with the cache warm. Target: < 0.2 s.

    python bench/hash_bench.py [--size-mb 2048] [--repeat 3] [--dir /tmp]

The big file is a real safetensors file (header + random data) so that AutoV3 is computed; it is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_sdtoolkit.files.hashes import hash_file  # noqa: E402


def make_big(path: Path, size_mb: int) -> None:
    n = size_mb << 20
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    block = os.urandom(16 << 20)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        left = n
        while left:
            k = min(left, len(block))
            fh.write(block[:k])
            left -= k


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdt-hash-bench-", dir=args.dir))
    try:
        big = work / "big.safetensors"
        make_big(big, args.size_mb)
        size = big.stat().st_size
        hash_file(big, ["sha256"])  # warm the page cache
        gb = size / 1e9
        ref = subprocess.run(["sha256sum", str(big)], capture_output=True, text=True, check=True).stdout.split()[0]
        assert hash_file(big, ["sha256"]).sha256 == ref
        t_coreutils = best(lambda: subprocess.run(["sha256sum", str(big)], capture_output=True, check=True),
                           args.repeat)
        t_ours = best(lambda: hash_file(big, ["sha256"]), args.repeat)
        t_all = best(lambda: hash_file(big), args.repeat)
        print(f"machine: {os.cpu_count()} CPUs; file {size / 2**20:.0f} MiB (page-cached), best of {args.repeat}")
        print(f"sha256sum          {t_coreutils:7.3f} s  {gb / t_coreutils:6.2f} GB/s")
        print(f"ours sha256        {t_ours:7.3f} s  {gb / t_ours:6.2f} GB/s   speed ratio vs sha256sum: "
              f"{t_coreutils / t_ours:.3f}x (target >= 0.95)")
        print(f"ours all five      {t_all:7.3f} s  {gb / t_all:6.2f} GB/s   time ratio vs sha256 alone: "
              f"{t_all / t_ours:.3f}x (target <= 1.3)")
        big.unlink()

        # 3. warm dedup scan of 100 files
        import torch

        from lib_sdtoolkit.dedup import scan
        from lib_sdtoolkit.files import save_safetensors
        from lib_sdtoolkit.files.hash_cache import HashCache

        folder = work / "VAE"
        folder.mkdir()
        g = torch.Generator().manual_seed(0)
        for i in range(100):
            sd = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
                  "decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g) if i % 10 else
                  torch.zeros(3, 8, 3, 3)}
            save_safetensors(folder / f"vae{i:03d}.safetensors", sd)
        with HashCache(work / "cache.sqlite") as cache:
            t = time.perf_counter()
            cold = scan([folder], "vae", cache)
            t_cold = time.perf_counter() - t
        with HashCache(work / "cache.sqlite") as cache:
            t = time.perf_counter()
            warm = scan([folder], "vae", cache)
            t_warm = time.perf_counter() - t
        assert len(warm.files) == 100 and warm.read_files == 0
        print(f"dedup scan, 100 files: cold {t_cold:.3f} s ({cold.read_files} read), warm {t_warm:.3f} s "
              f"({warm.read_files} read) (target < 0.2 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
