"""Hash benchmark: our sha256 and our five hashes in one read vs ``openssl dgst -sha256`` and ``sha256sum``.

    python bench/hash_bench.py [--size tiny|mid|full] [--rounds 3] [--size-mb N] [--dir DIR] [--no-cold]

The file is a real safetensors file (header + random bytes, so that AutoV3 is computed): 64 MiB (tiny),
512 MiB (mid) or 2048 MiB (full), written once into ``--dir`` (default ``bench/models_hash``) and reused.

Whole commands (start-up included), alternated over the rounds:

* ``openssl dgst -sha256 FILE`` -- the strongest baseline here: the same OpenSSL (SHA-NI where the CPU has it)
  that Python's hashlib and so our sha256 use;
* ``sha256sum FILE`` (coreutils; on many builds without SHA-NI);
* ``python -m lib_sdtoolkit hash --algo sha256 --no-cache --json FILE`` (ours, sha256 alone);
* ``python -m lib_sdtoolkit hash --algo all --no-cache --json FILE`` (ours, all five in one read).

In-process (one child process, same alternation): ``hash_file(path, ["sha256"])`` and ``hash_file(path)``
(all five) vs ``hashlib.sha256`` over 16 MiB ``readinto`` chunks (the plain-Python floor; OpenSSL too).

Warm cache: the file is read once before each run. Cold cache: it is fsynced and dropped from the page cache
(``posix_fadvise(DONTNEED)``) before each run; the residency before each run is printed. No side writes anything
(no durability question). Every digest is checked equal to openssl's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SIZES_MB = {"tiny": 64, "mid": 512, "full": 2048}


def make_file(path: Path, size_mb: int) -> None:
    n = size_mb << 20
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    block = os.urandom(16 << 20)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        left = n
        while left:
            k = min(left, len(block))
            fh.write(block[:k])
            left -= k
    os.replace(tmp, path)


def hashlib_sha256(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def inproc_child(path: str, rounds: int, cold: bool) -> dict:
    """Run the in-process sides alternately (in this child, which has imported lib_sdtoolkit and torch)."""
    sys.path.insert(0, str(C.ROOT))
    from lib_sdtoolkit.files.hashes import hash_file

    digests = {}

    import resource

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def side(name, fn):
        def run():
            t, c = time.perf_counter(), cpu()
            digests[name] = fn()
            return {"seconds": time.perf_counter() - t, "cpu_s": cpu() - c}
        before = (lambda: C.evict([path])) if cold else (lambda: C.warm([path]))
        return C.Side(name, run, before, files=[path])

    sides = [side("hashlib.sha256 (OpenSSL)", lambda: hashlib_sha256(path)),
             side("ours sha256", lambda: hash_file(path, ["sha256"]).sha256),
             side("ours all five", lambda: hash_file(path).sha256)]
    r = C.alternate(sides, rounds, log=lambda s: print(s, file=sys.stderr, flush=True))
    from lib_sdtoolkit.files.hashes import crc32_backend, lane_plan, normalize_algos

    return {"rounds": r.to_json(), "digests": digests, "crc32": crc32_backend()[0],
            "lanes": [list(x) for x in lane_plan(normalize_algos(None))]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.size_arg(ap)
    ap.add_argument("--size-mb", type=int, help="file size (overrides --size)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-cold", action="store_true", help="warm-cache rounds only")
    ap.add_argument("--inproc-child", nargs=3, metavar=("FILE", "ROUNDS", "COLD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inproc_child:
        f, n, cold = args.inproc_child
        print(json.dumps(inproc_child(f, int(n), cold == "1")))
        return 0
    log = lambda s: print(s, flush=True)  # noqa: E731
    d = Path(args.dir) if args.dir else C.bench_dir("models_hash")
    mb = args.size_mb or SIZES_MB[args.size]
    path = d / f"hash-{mb}mib.safetensors"
    if not path.exists():
        t = time.perf_counter()
        make_file(path, mb)
        log(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    log(f"machine: {C.machine_facts(d)}")
    gb = path.stat().st_size / 1e9
    env = C.torch_free_env()
    env["SDTOOLKIT_CACHE_DIR"] = str(d / "cache")
    digests = {}

    def cmd(name, argv, parse):
        def run():
            r = C.run_command(argv, env=env, cwd=C.ROOT)
            digests[name] = parse(r["stdout"])
            return {"seconds": r["wall"], "rss_mb": r["rss_mb"]}
        return name, run, C.cmd_str(argv).replace(str(path), "FILE")

    specs = [cmd("openssl dgst -sha256", ["openssl", "dgst", "-sha256", "-r", str(path)], lambda o: o.split()[0]),
             cmd("sha256sum", ["sha256sum", str(path)], lambda o: o.split()[0]),
             cmd("ours sha256", [C.PY, "-m", "lib_sdtoolkit", "hash", "--algo", "sha256", "--no-cache", "--json",
                                 str(path)], lambda o: json.loads(o)["sha256"]),
             cmd("ours all five", [C.PY, "-m", "lib_sdtoolkit", "hash", "--algo", "all", "--no-cache", "--json",
                                   str(path)], lambda o: json.loads(o)["sha256"])]
    rows = []
    caches = ["warm"] + ([] if args.no_cold else ["cold"])
    for cache in caches:
        before = (lambda: C.warm([path])) if cache == "warm" else (lambda: C.evict([path]))
        sides = [C.Side(n, fn, before, files=[path], command=c) for n, fn, c in specs]
        log(f"\n== hash {mb} MiB, {cache} cache, whole commands, {args.rounds} alternated rounds; load {C.loadavg()} ==")
        r = C.alternate(sides, args.rounds, log)
        C.print_summary(r, "seconds", title=f"hash {cache}, whole command wall", ref="openssl dgst -sha256", log=log)
        C.print_summary(r, "rss_mb", unit="MB", digits=0, title=f"hash {cache}, peak RSS", log=log)
        ref = digests["openssl dgst -sha256"]
        bad = [n for n, v in digests.items() if v != ref]
        check = f"sha256 equal on all {len(digests)} sides" if not bad else f"DIGEST DIFFERS: {', '.join(bad)}"
        log(f"  check: {check}; GB/s medians: " + ", ".join(
            f"{s.name} {gb / C.med_min_max(r.values(s.name, 'seconds'))[0]:.2f}" for s in sides))
        cmds = {s.name: s.command for s in sides}
        for other in ("openssl dgst -sha256", "sha256sum"):
            rows.append(C.row_for(r, f"hash {mb} MiB", f"ours sha256 vs {other}, whole command", "ours sha256", other,
                                  "seconds", check, cache, cmds["ours sha256"]))
        rs = C.ratios(r, "ours all five", "ours sha256", "seconds")
        rows.append(C.row_for(r, f"hash {mb} MiB", "all five vs sha256 alone (ours), whole command", "ours all five",
                              "ours sha256", "seconds", check, cache, cmds["ours all five"],
                              target=C.target_text(C.med_min_max(rs)[0], 1.3)))

        # in-process
        ip = C.run_command([C.PY, str(Path(__file__).resolve()), "--inproc-child", str(path), str(args.rounds),
                            "1" if cache == "cold" else "0"], env=env, cwd=C.ROOT)
        j = C.last_json(ip["stdout"])
        ri = C.Rounds.from_json(j["rounds"])
        log(f"-- in-process ({cache}) --")
        for line in ip["stderr"].strip().splitlines():
            if line.startswith("  round"):
                log(line)
        C.print_summary(ri, "seconds", title=f"hash {cache}, in-process", ref="hashlib.sha256 (OpenSSL)", log=log)
        C.print_summary(ri, "cpu_s", title=f"hash {cache}, in-process CPU time (all threads; the load-independent "
                        "cost)", ref="ours sha256", log=log)
        log(f"  CRC32 from {j.get('crc32', '?')}; lanes (one thread each): {j.get('lanes', '?')}")
        bad = [n for n, v in j["digests"].items() if v != ref]
        icheck = f"sha256 equal on all {len(j['digests'])} sides" if not bad else f"DIGEST DIFFERS: {', '.join(bad)}"
        log(f"  check: {icheck}")
        icmd = f"python bench/hash_bench.py --size-mb {mb} (in-process child)"
        rows.append(C.row_for(ri, f"hash {mb} MiB", "ours sha256 vs hashlib.sha256, in-process", "ours sha256",
                              "hashlib.sha256 (OpenSSL)", "seconds", icheck, cache, icmd))
        rs = C.ratios(ri, "ours all five", "ours sha256", "seconds")
        rows.append(C.row_for(ri, f"hash {mb} MiB", "all five vs sha256 alone (ours), in-process", "ours all five",
                              "ours sha256", "seconds", icheck, cache, icmd,
                              target=C.target_text(C.med_min_max(rs)[0], 1.3)))
        rows.append(C.row_for(ri, f"hash {mb} MiB", f"all five vs sha256 alone (ours), in-process CPU seconds "
                              f"(CRC32: {j.get('crc32', '?')})", "ours all five", "ours sha256", "cpu_s", icheck,
                              cache, icmd))
        C.emit_rows(rows, args.rows)  # after each cache state: a run stopped later keeps what it measured
    C.emit_rows(rows, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
