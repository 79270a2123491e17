"""Inspect benchmark: ours vs a lazy ``safetensors.safe_open`` header + keys read (and, named as such, a full load).

    python bench/inspect_bench.py [--size tiny|mid|full] [--rounds 3] [--file PATH] [--no-cold]

The file: a full-size SD1.5 fp16 checkpoint (mid/full; in ``bench/models_inspect``) or the
tiny-width one (tiny), random weights with the real keys. ``--file`` uses a file of yours instead.

Sides, equal work -- read the header and list the keys (ours also detects the architecture and sums components):

* ours: ``python -m lib_sdtoolkit inspect FILE --json``;
* safe_open (lazy): ``safe_open(FILE, "np")``, ``list(keys())``, ``metadata()`` -- the strongest baseline: it reads
  the header only;
* naive: ``safetensors.torch.load_file(FILE)`` and ``len()`` of the dict, no clone (safetensors >= 0.8
  ``load_file`` is lazy, memory-mapped: what a user's naive script costs);
* ``--with-clone`` (a different job, named as such): ``load_file`` plus a ``clone()`` of every tensor.

Whole commands (``python -m ...`` / ``python -c ...``, start-up included) and in-process (each side in its own child
process that has imported torch and lib_sdtoolkit first; time and peak RSS above that baseline, the peak reset
through ``/proc/self/clear_refs``). Alternated rounds, warm cache (file read before each run) and cold (evicted
with ``posix_fadvise(DONTNEED)`` before each run; residency printed). Check: the key counts agree. No writes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LAZY = ("import sys; from safetensors import safe_open\n"
        "with safe_open(sys.argv[1], 'np') as f:\n    keys = list(f.keys()); meta = f.metadata()\n"
        "print(len(keys))")
NAIVE = ("import sys; from safetensors.torch import load_file\n"
         "sd = load_file(sys.argv[1])\nprint(len(sd))")
FULL = ("import sys; from safetensors.torch import load_file\n"
        "sd = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}\nprint(len(sd))")

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + "/bench")
import torch  # the same baseline on every side: interpreter + torch + lib_sdtoolkit
import lib_sdtoolkit.inspect as insp
from safetensors import safe_open
from safetensors.torch import load_file
import _common as C
path, mode = sys.argv[1], sys.argv[2]
C.reset_peak_rss()
base = C.status_mb("VmRSS")
t = time.perf_counter()
if mode == "ours":
    n = insp.inspect_file(path)["total_keys"]
elif mode == "lazy":
    with safe_open(path, "np") as f:
        keys = list(f.keys()); meta = f.metadata()
    n = len(keys)
elif mode == "naive":
    sd = load_file(path)
    n = len(sd)
else:
    sd = {k: v.clone() for k, v in load_file(path).items()}
    n = len(sd)
dt = time.perf_counter() - t
print(json.dumps({"inproc": dt, "above_base_mb": C.status_mb("VmHWM") - base, "keys": n}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.size_arg(ap)
    ap.add_argument("--file", type=Path)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--no-full-load", action="store_true", help="(default now) leave out the load + clone side")
    ap.add_argument("--with-clone", action="store_true",
                    help="add a side that clones every tensor after load_file (a different job: a full copy)")
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.file:
        path = args.file
    else:
        import merge_bench

        # its own file (not the merge bench's inputs), so that running both at once does not warm or evict the
        # other's files
        d = C.bench_dir("models_inspect")
        path = merge_bench.ensure_models(d, "SD1.5", "SD1", "tiny" if args.size == "tiny" else "full", log,
                                       n=1)[0]
    log(f"machine: {C.machine_facts(path.parent)}")
    env = C.torch_free_env()
    keys = {}

    def whole(name, argv, parse):
        def run():
            r = C.run_command(argv, env=env, cwd=C.ROOT)
            keys[name] = parse(r["stdout"])
            return {"seconds": r["wall"], "rss_mb": r["rss_mb"]}
        return name, run, C.cmd_str(argv).replace(str(path), "FILE")

    def inproc(name, mode):
        argv = [C.PY, "-c", CHILD, str(path), mode, str(C.ROOT)]

        def run():
            r = C.run_command(argv, env=env, cwd=C.ROOT)
            j = C.last_json(r["stdout"])
            keys[name] = j["keys"]
            return {"seconds": j["inproc"], "mem_mb": j["above_base_mb"], "wall": r["wall"]}
        return name, run, f"bench/inspect_bench.py in-process child, mode {mode}"

    wspecs = [whole("ours", [C.PY, "-m", "lib_sdtoolkit", "inspect", "--json", str(path)],
                    lambda o: json.loads(o)["total_keys"]),
              whole("safe_open (lazy)", [C.PY, "-c", LAZY, str(path)], lambda o: int(o.split()[-1]))]
    ispecs = [inproc("ours", "ours"), inproc("safe_open (lazy)", "lazy")]
    # the naive side as people write it: load_file and look at the dict (safetensors >= 0.8: memory-mapped, no copy)
    wspecs.append(whole("load_file (naive)", [C.PY, "-c", NAIVE, str(path)], lambda o: int(o.split()[-1])))
    ispecs.append(inproc("load_file (naive)", "naive"))
    if args.with_clone and not args.no_full_load:
        wspecs.append(whole("full load (load_file + clone)", [C.PY, "-c", FULL, str(path)],
                            lambda o: int(o.split()[-1])))
        ispecs.append(inproc("full load (load_file + clone)", "full"))
    rows = []
    label = f"inspect {'SD1.5 tiny' if args.size == 'tiny' and not args.file else path.name}"
    for cache in ["warm"] + ([] if args.no_cold else ["cold"]):
        before = (lambda: C.warm([path])) if cache == "warm" else (lambda: C.evict([path]))
        for kind, specs in (("whole command", wspecs), ("in-process", ispecs)):
            keys.clear()
            sides = [C.Side(n, fn, before, files=[path], command=c) for n, fn, c in specs]
            log(f"\n== {label} ({path.stat().st_size / 1e9:.2f} GB), {cache} cache, {kind}, {args.rounds} rounds; "
                f"load {C.loadavg()} ==")
            r = C.alternate(sides, args.rounds, log)
            C.print_summary(r, "seconds", unit="ms", scale=1000, digits=1, title=f"{kind} time",
                            ref="safe_open (lazy)", log=log)
            mem = "rss_mb" if kind == "whole command" else "mem_mb"
            C.print_summary(r, mem, unit="MB", digits=0, ref="safe_open (lazy)", log=log,
                            title="peak RSS" if kind == "whole command" else "peak RSS above the baseline")
            ok = len(set(keys.values())) == 1
            check = f"key counts equal ({next(iter(keys.values()))})" if ok else f"KEY COUNTS DIFFER: {keys}"
            log(f"  check: {check}")
            cmds = {s.name: s.command for s in sides}
            for other in [s.name for s in sides if s.name != "ours"]:
                rows.append(C.row_for(r, label, f"ours vs {other}, {kind} time", "ours", other, "seconds", check,
                                      cache, cmds["ours"], unit="ms", scale=1000, digits=1))
                if other == "safe_open (lazy)":
                    rows.append(C.row_for(r, label, f"ours vs {other}, {kind} "
                                          + ("peak RSS" if mem == "rss_mb" else "peak RSS above torch-imported base"),
                                          "ours", other, mem, check, cache, cmds["ours"], unit="MB", digits=0))
    C.emit_rows(rows, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
