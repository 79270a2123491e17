"""Whole commands, timed from outside: ``python -m lib_sdtoolkit merge|hash|inspect`` against their baselines.

    python bench/whole_commands.py [--size tiny|mid|full] [--rounds 3] [--only merge,hash,inspect] [--no-cold]

An independent check of the in-process benches (issue 18, "Done when"): it shares none of their timing code
(``bench/_common.py`` is used only to hand the table rows to ``run_all.py``). Each pair is two shell-level
commands run one after the other, the order swapped every round (A B, B A, A B, ...), ``--rounds`` pairs; the
wall time is this process's clock around ``fork`` + ``wait4`` (start-up, imports, the work and the exit all
included), the peak RSS is the child's own (``wait4``'s ``ru_maxrss``; for a shell pipeline that is the largest
process in it). Printed per pair: each round's two times, its ratio and the 1-minute load average just before it,
then median [min-max] of each side and of the per-round ratios.

Pairs (the same input files on both sides; outputs checked):

* merge: ``python -m lib_sdtoolkit merge A B --alpha 0.3 --dtype fp16 -o OUT`` (writes and fsyncs OUT) against
  the I/O floor ``cat A B >/dev/null; cp A OUT; sync OUT`` (read both inputs, write and fsync an output of the same
  size). Cold cache on both sides (the inputs fsynced and dropped with ``posix_fadvise(DONTNEED)`` before every
  run; the residency just before it is printed). The merged file is checked against ``0.7*A + 0.3*B`` on sampled
  keys (max abs difference printed) and against ``0.3*A + 0.7*B`` (so a swapped alpha cannot pass).
* hash: ``python -m lib_sdtoolkit hash --algo sha256 --no-cache --json F`` against ``openssl dgst -sha256 F``
  (the same OpenSSL SHA-256 that Python's hashlib uses) and against ``sha256sum F``; and ``--algo all`` against
  ``--algo sha256`` (all five hashes vs sha256 alone, issue 17.3). Digests checked equal. Warm and cold cache.
* inspect: ``python -m lib_sdtoolkit inspect --json F`` against ``python -c "load_file(F); len(sd)"`` (safetensors'
  ``load_file``: lazy since 0.8) and against ``safe_open(F).keys()`` (header only). Key counts checked equal.

Files: tiny = tiny-width SD1.5 (18 MB) and a 64 MiB hash file; mid = full-width SD1.5 fp16 (2.1 GB) and 512 MiB;
full = full SD1.5 and 2 GiB. Written once into ``bench/models_whole`` (or ``$SDTOOLKIT_BENCH_DIR/models_whole``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PY = sys.executable
SIZES = ("tiny", "mid", "full")
HASH_MB = {"tiny": 64, "mid": 512, "full": 2048}
ALPHA = 0.3
WORKLOADS = ("merge", "hash", "inspect")


# --------------------------------------------------------------------------------------------------- the clock
_MEASURE = r"""
import os, sys, time, json, resource
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.execv("/bin/sh", ["/bin/sh", "-c", sys.argv[1]])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "rss_mb": ru.ru_maxrss / 1024, "status": os.waitstatus_to_exitcode(status)}))
"""


def measured(cmd: str, env: Optional[Dict[str, str]] = None) -> Tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of ``cmd``: a tiny Python helper forks it, times fork..wait4 and reads
    the child's own ``ru_maxrss`` (the helper's start-up is outside the clock)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    out_path = f"/tmp/sdt-whole-{os.getpid()}.out"
    try:
        p = subprocess.run([PY, "-c", _MEASURE, cmd, out_path], capture_output=True, text=True, env=full_env,
                           cwd=str(ROOT))
        if p.returncode != 0:
            raise RuntimeError(f"measuring {cmd!r} failed: {p.stderr[-800:]}")
        j = json.loads(p.stdout.strip().splitlines()[-1])
        with open(out_path, errors="replace") as fh:
            out = fh.read()
    finally:
        try:
            os.unlink(out_path)
        except OSError:
            pass
    if j["status"] != 0:
        raise RuntimeError(f"{cmd} exited {j['status']}: {out[-800:]} {p.stderr[-800:]}")
    return j["wall"], j["rss_mb"], out


# --------------------------------------------------------------------------------------------------- page cache
def evict(paths: Sequence[Path]) -> None:
    for path in paths:
        if not Path(path).exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Sequence[Path]) -> None:
    buf = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def resident(paths: Sequence[Path]) -> str:
    """Share of the files' pages in the page cache (``fincore`` from util-linux), or '?'."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, paths)],
                             capture_output=True, text=True, check=True).stdout.split()
        res = sum(int(x) for x in out[0::2])
        size = sum(int(x) for x in out[1::2])
        return f"{100 * res / size:.0f}%" if size else "?"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "?"


def load1() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------------- pairs
class Pair:
    """A (ours) against B (baseline); ``prepare(side)`` (0 for A, 1 for B) runs untimed before each run."""

    def __init__(self, workload: str, label: str, cache: str, a: Tuple[str, str], b: Tuple[str, str],
                 prepare: Callable[[int], None], files: Sequence[Path], check: Callable[[Dict[str, List[str]]], str],
                 env: Optional[Dict[str, str]] = None, target: str = "") -> None:
        self.workload, self.label, self.cache = workload, label, cache
        self.a, self.b = a, b
        self.prepare, self.files, self.check, self.env, self.target = prepare, files, check, env, target


def med(xs: Sequence[float]) -> Tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def fmt(xs: Sequence[float], unit: str = " s") -> str:
    m, lo, hi = med(xs)
    return f"{m:.2f}{unit} [{lo:.2f}-{hi:.2f}]"


def run_pair(pair: Pair, rounds: int, log: Callable[[str], None]) -> dict:
    (an, acmd), (bn, bcmd) = pair.a, pair.b
    log(f"\n== {pair.workload}: {pair.label}, {pair.cache} cache ==\n  A: {acmd}\n  B: {bcmd}")
    times: Dict[str, List[float]] = {an: [], bn: []}
    rss: Dict[str, List[float]] = {an: [], bn: []}
    outs: Dict[str, List[str]] = {an: [], bn: []}
    loads: List[float] = []
    ratios: List[float] = []
    for r in range(rounds):
        order = [(0, an, acmd), (1, bn, bcmd)] if r % 2 == 0 else [(1, bn, bcmd), (0, an, acmd)]
        loads.append(load1())
        res_before = {}
        for side, name, cmd in order:
            pair.prepare(side)
            res_before[name] = resident(pair.files) if pair.files else "-"
            wall, mb, out = measured(cmd, pair.env)
            times[name].append(wall)
            rss[name].append(mb)
            outs[name].append(out)
        ratios.append(times[an][-1] / times[bn][-1])
        log(f"  round {r + 1}/{rounds} ({'A B' if r % 2 == 0 else 'B A'}) load {loads[-1]:.2f}: "
            f"A {times[an][-1]:.2f} s (resident {res_before[an]}, {rss[an][-1]:.0f} MB), "
            f"B {times[bn][-1]:.2f} s (resident {res_before[bn]}, {rss[bn][-1]:.0f} MB) -> A/B {ratios[-1]:.2f}")
    check = pair.check(outs)
    log(f"  A {an}: {fmt(times[an])}, peak RSS {fmt(rss[an], ' MB')}\n  B {bn}: {fmt(times[bn])}\n"
        f"  ratio A/B per round: {', '.join(f'{x:.2f}' for x in ratios)} -> median {fmt(ratios, 'x')}\n"
        f"  check: {check}")
    return {"workload": pair.workload, "label": pair.label, "cache": pair.cache, "a": an, "b": bn,
            "a_cmd": acmd, "b_cmd": bcmd, "a_s": times[an], "b_s": times[bn], "a_rss": rss[an], "ratios": ratios,
            "loads": loads, "check": check, "target": pair.target}


# --------------------------------------------------------------------------------------------------- files
def q(p) -> str:
    return shlex.quote(str(p))


def ensure_checkpoints(d: Path, size: str, log) -> Tuple[Path, Path]:
    import merge_bench  # only its file writer (the tiny model factory, the real SD1.5 key layout)

    return merge_bench.ensure_models(d, "SD1.5", "SD1", "tiny" if size == "tiny" else "full", log)


def ensure_hash_file(d: Path, size: str, log) -> Path:
    import hash_bench

    mb = HASH_MB[size]
    p = d / f"hash-{mb}mib.safetensors"
    if not p.exists():
        hash_bench.make_file(p, mb)
        log(f"wrote {p}")
    return p


MERGE_CHECK = r"""
import json, sys
import numpy as np
from safetensors import safe_open
a, b, o, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
worst = swapped = 0.0
n = 0
with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb, safe_open(o, "pt") as fo:
    keys = [k for k in fo.keys() if k in set(fa.keys())]
    for k in keys[:: max(1, len(keys) // 60)]:
        ta, tb, to = fa.get_tensor(k).float(), fb.get_tensor(k).float(), fo.get_tensor(k).float()
        if not ta.is_floating_point() or ta.shape != to.shape:
            continue
        want = (ta * (1 - alpha) + tb * alpha).to(fo.get_tensor(k).dtype).float()
        worst = max(worst, float((to - want).abs().max()) if to.numel() else 0.0)
        other = (ta * alpha + tb * (1 - alpha)).to(fo.get_tensor(k).dtype).float()
        swapped = max(swapped, float((to - other).abs().max()) if to.numel() else 0.0)
        n += 1
print(json.dumps({"keys": n, "max_abs": worst, "max_abs_swapped": swapped}))
"""


def merge_pairs(a: Path, b: Path, d: Path, env: Dict[str, str]) -> List[Pair]:
    out_ours, out_floor = d / "whole-out-ours.safetensors", d / "whole-out-floor.safetensors"

    def prepare(side: int) -> None:
        o = (out_ours, out_floor)[side]  # only this side's output: the other is checked at the end
        if o.exists():
            o.unlink()
        evict([a, b])

    def check(outs) -> str:
        p = subprocess.run([PY, "-c", MERGE_CHECK, str(a), str(b), str(out_ours), str(ALPHA)], capture_output=True,
                           text=True, env={**os.environ, **env})
        if p.returncode != 0:
            return f"CHECK FAILED: {p.stderr[-300:]}"
        j = json.loads(p.stdout.strip().splitlines()[-1])
        ok = j["max_abs"] <= 1e-3 and j["max_abs_swapped"] > j["max_abs"]
        size_ok = out_floor.stat().st_size == a.stat().st_size
        return (f"{'OK' if ok and size_ok else 'MISMATCH'}: merged = 0.7*A + 0.3*B on {j['keys']} sampled keys, max "
                f"abs diff {j['max_abs']:.2e} (vs the swapped alpha {j['max_abs_swapped']:.2e}); floor output "
                f"{'the size of A' if size_ok else 'WRONG SIZE'}; both fsynced")

    ours = ("ours: merge",
            f"{q(PY)} -m lib_sdtoolkit merge {q(a)} {q(b)} --alpha {ALPHA} --dtype fp16 -q --json -o {q(out_ours)}")
    floor = ("I/O floor (cat A B; cp A OUT; sync OUT)",
             f"cat {q(a)} {q(b)} >/dev/null; cp {q(a)} {q(out_floor)}; sync {q(out_floor)}")
    return [Pair("merge", f"{a.name} + {b.name} ({a.stat().st_size / 1e9:.2f} GB each)", "cold", ours, floor,
                 prepare, [a, b], check, env, target="<= 1.3x (issue 17.2)")]


def hash_pairs(f: Path, env: Dict[str, str], caches: Sequence[str]) -> List[Pair]:
    def digest_check(outs) -> str:
        seen = set()
        for name, texts in outs.items():
            for t in texts:
                t = t.strip()
                seen.add(json.loads(t)["sha256"] if t.startswith("{") else t.split()[0].lower())
        return "sha256 equal on both sides" if len(seen) == 1 else f"DIGESTS DIFFER: {sorted(seen)}"

    sha = ("ours: hash --algo sha256", f"{q(PY)} -m lib_sdtoolkit hash --algo sha256 --no-cache --json {q(f)}")
    allf = ("ours: hash --algo all", f"{q(PY)} -m lib_sdtoolkit hash --algo all --no-cache --json {q(f)}")
    openssl = ("openssl dgst -sha256", f"openssl dgst -sha256 -r {q(f)}")
    coreutils = ("sha256sum", f"sha256sum {q(f)}")
    label = f"{f.name} ({f.stat().st_size / 2**20:.0f} MiB)"
    out = []
    for cache in caches:
        prep = (lambda side: evict([f])) if cache == "cold" else (lambda side: warm([f]))
        out += [Pair("hash", label, cache, sha, openssl, prep, [f], digest_check, env),
                Pair("hash", label, cache, sha, coreutils, prep, [f], digest_check, env),
                Pair("hash", label, cache, allf, sha, prep, [f], digest_check, env, target="<= 1.3x (issue 17.3)")]
    return out


LOAD_FILE = "import sys; from safetensors.torch import load_file; sd = load_file(sys.argv[1]); print(len(sd))"
SAFE_OPEN = ("import sys; from safetensors import safe_open\n"
             "with safe_open(sys.argv[1], 'np') as f: print(len(list(f.keys())))")


def inspect_pairs(f: Path, env: Dict[str, str], caches: Sequence[str]) -> List[Pair]:
    def keys_check(outs) -> str:
        seen = set()
        for texts in outs.values():
            for t in texts:
                t = t.strip()
                seen.add(json.loads(t)["total_keys"] if t.startswith("{") else int(t.split()[-1]))
        return f"key counts equal ({seen.pop()})" if len(seen) == 1 else f"KEY COUNTS DIFFER: {sorted(seen)}"

    ours = ("ours: inspect --json", f"{q(PY)} -m lib_sdtoolkit inspect --json {q(f)}")
    naive = ("python -c load_file(F)", f"{q(PY)} -c {q(LOAD_FILE)} {q(f)}")
    lazy = ("python -c safe_open(F).keys()", f"{q(PY)} -c {q(SAFE_OPEN)} {q(f)}")
    label = f"{f.name} ({f.stat().st_size / 1e9:.2f} GB)"
    out = []
    for cache in caches:
        prep = (lambda side: evict([f])) if cache == "cold" else (lambda side: warm([f]))
        out += [Pair("inspect", label, cache, ours, naive, prep, [f], keys_check, env),
                Pair("inspect", label, cache, ours, lazy, prep, [f], keys_check, env)]
    return out


# --------------------------------------------------------------------------------------------------- main
def rows_for(results: List[dict], size: str) -> list:
    import _common as C

    rows = []
    for r in results:
        m, lo, hi = med(r["ratios"])
        target = r["target"]
        if target:
            limit = float(target.split("<=")[1].split("x")[0])
            target = f"{target}: {'met' if m <= limit else f'missed ({m / limit:.2f}x the target)'}"
        rows.append(C.Row(f"whole {r['workload']} {size}", f"{r['a']} vs {r['b']} ({r['label']})",
                          f"{r['a']}: {fmt(r['a_s'])}", f"{r['b']}: {fmt(r['b_s'])}",
                          f"{m:.2f}x [{lo:.2f}-{hi:.2f}]", r["check"], r["cache"],
                          f"python bench/whole_commands.py --size {size} --only {r['workload']}", target,
                          ", ".join(f"{x:.1f}" for x in r["loads"])))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="mid")
    ap.add_argument("--rounds", type=int, default=3, help="pairs per comparison (>= 3 for published figures)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--no-cold", action="store_true", help="hash and inspect: warm cache only (merge is always cold)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload {', '.join(bad)}")
    base = Path(args.dir) if args.dir else Path(os.environ.get("SDTOOLKIT_BENCH_DIR") or HERE) / "models_whole"
    base.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"load average {os.getloadavg()}; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SDTOOLKIT_CACHE_DIR": str(base / "cache")}
    caches = ["warm"] + ([] if args.no_cold else ["cold"])
    pairs: List[Pair] = []
    if "merge" in only or "inspect" in only:
        a, b = ensure_checkpoints(base, args.size, log)
        if "merge" in only:
            pairs += merge_pairs(a, b, base, env)
        if "inspect" in only:
            pairs += inspect_pairs(a, env, caches)
    if "hash" in only:
        pairs += hash_pairs(ensure_hash_file(base, args.size, log), env, caches)
    results = []
    rows_path = args.rows
    import _common as C

    for pair in pairs:
        results.append(run_pair(pair, args.rounds, log))
        C.emit_rows(rows_for(results, args.size), rows_path)
    for o in ("whole-out-ours.safetensors", "whole-out-floor.safetensors"):
        if (base / o).exists():
            (base / o).unlink()
    log("\nsummary (ratio A/B: median [min-max] over the rounds; load average at each round):")
    for r in results:
        log(f"  {r['workload']:7s} {r['cache']:4s} {r['a']} / {r['b']}: {fmt(r['ratios'], 'x')}  "
            f"loads {', '.join(f'{x:.1f}' for x in r['loads'])}  {r['check']}")
    failed = [r for r in results if not (r["check"].startswith("OK") or "equal" in r["check"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
