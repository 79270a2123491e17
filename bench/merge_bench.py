"""Merge benchmark: ours vs the I/O floor, sd-mecha and a naive load-everything merge, as whole commands.

    python bench/merge_bench.py [--size tiny|mid|full] [--rounds 3] [--skip-mecha] [--skip-naive] [--skip-nometa]
                                [--no-warm] [--only-model SD1.5|SDXL] [--dir DIR] [--clean]

Inputs: two checkpoints with random weights, real keys and shapes, fp16 (``lib_sdtoolkit.samples.factory``):
tiny = tiny-width SD1.5 layout (18 MB each); mid = full SD1.5 (2.1 GB each); full = full SD1.5 and full SDXL
(6.9 GB each). Written once into ``--dir`` (default ``bench/models_merge``, git-ignored) and reused (``--clean``
deletes them at the end).

Every side does the same work: weighted sum at alpha (M) = 0.3, i.e. ``A*0.7 + B*0.3``, fp32 maths, fp16 output,
the output fsynced before the command returns. Each side is a whole command (its wall time includes start-up),
and the children also report their in-process time (after imports):

* I/O floor: ``cat A B >/dev/null; cp A OUT; sync OUT`` (read both inputs, write and fsync one output-sized file);
* ours: ``python -m lib_sdtoolkit merge A B -o OUT --alpha 0.3 --dtype fp16 --json`` (in-process time: the
  report's ``seconds``). The metadata names the inputs by sha256, which ours takes from the hash cache: the bench
  fills its own cache once before the rounds (untimed, ``python -m lib_sdtoolkit hash A B``), so each run reads
  each input once, as a merge of models the toolkit has seen does; ``ours --no-metadata`` hashes nothing;
* naive: ``safetensors.torch.load_file`` both, per key ``(A.float()*(1-M) + B.float()*M).half()``, ``save_file``,
  fsync;
* sd-mecha: ``sd_mecha.merge(weighted_sum(model(A), model(B), alpha=0.3), output=OUT, output_dtype=fp16,
  merge_dtype=fp32)``, then fsync.

Cold cache (every side): before each run the inputs are fsynced and dropped from the page cache with
``posix_fadvise(DONTNEED)`` and the residency just before the start is printed (mincore). Warm cache (ours and the
floor only, unless ``--no-warm``): the inputs are read once before each run. The sides alternate over ``--rounds``
rounds (order rotating). Each output is deleted right after its run (at most one output exists at a time beside
the inputs); after a side's last round its output is first checked: a digest of every tensor's bytes (so the
outputs are compared key by key with ours: how many tensors are bit-identical) and, on a sample of keys, the max
abs difference against ``A*0.7 + B*0.3`` and the swapped ``A*0.3 + B*0.7``, so that every tool is seen to take the
ratio the same way round. The bench's hash cache is deleted at the end.

Start-up as installed: ours runs from compiled bytecode (written once before the rounds into the bench's cache
folder, ``_common.bytecode_env``), as a pip- or WebUI-installed copy does, even where ``PYTHONDONTWRITEBYTECODE``
is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ALPHA = 0.3
MODELS = {"tiny": [("SD1.5", "SD1", "tiny")], "mid": [("SD1.5", "SD1", "full")],
          "full": [("SD1.5", "SD1", "full"), ("SDXL", "SDXL", "full")]}


# ----------------------------------------------------------------------------------------------- children
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child(mode: str, a: str, b: str, out: str) -> dict:
    import torch

    t0 = time.perf_counter()
    if mode == "naive":
        from safetensors.torch import load_file, save_file

        theta_0 = load_file(a)
        theta_1 = load_file(b)
        for k in list(theta_0):
            if k in theta_1 and theta_0[k].is_floating_point():
                theta_0[k] = (theta_0[k].float() * (1 - ALPHA) + theta_1[k].float() * ALPHA).half()
        del theta_1
        save_file(theta_0, out)
        _fsync(out)
    elif mode == "mecha":
        import sd_mecha

        recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=ALPHA)
        sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, merge_dtype=torch.float32)
        _fsync(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"inproc": time.perf_counter() - t0, "child_rss_mb": C.child_peak_rss_mb()}


def digest(a: str, b: str, out: str) -> dict:
    """One output, checked on its own (so that each output can be deleted right after its run: a full SDXL output
    is 6.9 GB and the disk is shared): a blake2b digest of every tensor's bytes (the outputs of two tools are
    compared key by key through these: equal digests = bit-identical tensors), and on a sample of keys the max
    abs difference against A*(1-M)+B*M and the swapped A*M+B*(1-M), each computed in fp32 and rounded to fp16 like
    the outputs, plus the max abs difference between the output and that expected value on the same sample."""
    import hashlib
    import struct

    from safetensors import safe_open

    with open(out, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        start = 8 + n
        digests = {}
        for k, spec in header.items():
            lo, hi = spec["data_offsets"]
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{spec['dtype']}{spec['shape']}".encode())
            fh.seek(start + lo)
            left = hi - lo
            while left:
                chunk = fh.read(min(left, 16 << 20))
                if not chunk:
                    raise SystemExit(f"{out}: truncated at {k}")
                h.update(chunk)
                left -= len(chunk)
            digests[k] = h.hexdigest()
    fa, fb, fo = safe_open(a, "pt"), safe_open(b, "pt"), safe_open(out, "pt")
    out_keys = set(fo.keys())
    b_keys = set(fb.keys())
    float_keys = [k for k in fa.keys() if k in out_keys and k in b_keys]
    sample = float_keys[:: max(1, len(float_keys) // 60)]
    ex = sw = 0.0
    for k in sample:
        ta, tb, o = fa.get_tensor(k), fb.get_tensor(k), fo.get_tensor(k).float()
        if not ta.is_floating_point() or o.numel() == 0:
            continue
        want = (ta.float() * (1 - ALPHA) + tb.float() * ALPHA).half().float()
        swap = (ta.float() * ALPHA + tb.float() * (1 - ALPHA)).half().float()
        ex = max(ex, float((o - want).abs().max()))
        sw = max(sw, float((o - swap).abs().max()))
    return {"keys": len(digests), "digests": digests, "sample_keys": len(sample), "max_abs_vs_expected": ex,
            "max_abs_vs_swapped": sw, "direction_ok": ex * 10 < sw}


# ----------------------------------------------------------------------------------------------- driver
def ensure_models(d: Path, label: str, arch: str, width: str, log, n: int = 2) -> tuple:
    paths = (d / f"{label}-{width}-a.safetensors", d / f"{label}-{width}-b.safetensors")[:n]
    for seed, p in enumerate(paths):
        if not p.exists():
            t = time.perf_counter()
            C.run_command([C.PY, "-c", "import sys, torch; sys.path.insert(0, sys.argv[1]);"
                           "from lib_sdtoolkit.samples import factory;"
                           "factory.write_checkpoint(sys.argv[2], sys.argv[3], width=sys.argv[4], "
                           "dtype=torch.float16, seed=int(sys.argv[5]))",
                           str(C.ROOT), str(p), arch, width, str(seed)])
            log(f"wrote {p} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    return paths


def bench_pair(label: str, a: Path, b: Path, d: Path, args, log) -> list:
    size_gb = a.stat().st_size / 1e9
    outs = {n: d / f"out-{a.stem[:-2]}-{n}.safetensors" for n in ("floor", "ours", "ours_nometa", "naive", "mecha")}
    env = C.torch_free_env()
    env["SDTOOLKIT_CACHE_DIR"] = str(d / "cache")
    env["SDTOOLKIT_MERGE_STATS"] = "1"  # ours prints where its time went (stderr), logged with each round
    env = C.bytecode_env(env, d / "cache" / "pycache")  # ours starts from bytecode, as an installed copy does

    def rm(p):
        def f():
            if p.exists():
                p.unlink()
        return f

    def cold(p):
        def f():
            rm(p)()
            C.evict([a, b])
        return f

    def hot(p):
        def f():
            rm(p)()
            C.warm([a, b])
        return f

    floor_cmd = f"cat {a} {b} >/dev/null; cp {a} {{out}}; sync {{out}}"

    def floor(out):
        def f():
            r = C.run_command(floor_cmd.format(out=out), shell=True)
            return {"seconds": r["wall"], "inproc": r["wall"], "rss_mb": r["rss_mb"]}
        return f

    def ours_argv(out, meta=True):
        return [C.PY, "-m", "lib_sdtoolkit", "merge", str(a), str(b), "-o", str(out), "--alpha", str(ALPHA),
                "--dtype", "fp16", "--json"] + ([] if meta else ["--no-metadata"])

    def ours(out, meta=True):
        def f():
            r = C.run_command(ours_argv(out, meta), env=env, cwd=C.ROOT)
            rep = json.loads(r["stdout"])
            split = C.merge_stats(r["stderr"])
            return {"seconds": r["wall"], "inproc": rep["seconds"], "rss_mb": r["rss_mb"], **split}
        return f

    def kid(mode, out):
        argv = [C.PY, str(Path(__file__).resolve()), "--child", mode, str(a), str(b), str(out)]

        def f():
            r = C.run_command(argv, env=env, cwd=C.ROOT)
            j = C.last_json(r["stdout"])
            return {"seconds": r["wall"], "inproc": j["inproc"], "rss_mb": r["rss_mb"]}
        return f, C.cmd_str(argv)

    checks = {}
    runs = {}

    def done(name, key):
        """After each run: the output is deleted (only one output exists at a time besides the inputs); after the
        side's last round it is first checked (:func:`digest`)."""
        def f(m):
            runs[name] = runs.get(name, 0) + 1
            p = outs[key]
            try:
                if runs[name] == args.rounds and name != "I/O floor" and p.exists():
                    argv = [C.PY, str(Path(__file__).resolve()), "--digest", str(a), str(b), str(p)]
                    checks[name] = C.last_json(C.run_command(argv, env=env, cwd=C.ROOT)["stdout"])
            finally:
                rm(p)()
        return f

    avail = C.mem_available_mb()
    need = {"naive": 1000 * (1.0 * size_gb) + 600, "mecha": 1000 * (0.6 * size_gb) + 600}
    sides = [C.Side("I/O floor", floor(outs["floor"]), cold(outs["floor"]), done("I/O floor", "floor"), files=[a, b],
                    command=floor_cmd.format(out="OUT")),
             C.Side("ours", ours(outs["ours"]), cold(outs["ours"]), done("ours", "ours"), files=[a, b],
                    command=C.cmd_str(ours_argv("OUT")))]
    if not args.skip_nometa:
        sides.append(C.Side("ours --no-metadata", ours(outs["ours_nometa"], False), cold(outs["ours_nometa"]),
                            done("ours --no-metadata", "ours_nometa"), files=[a, b],
                            command=C.cmd_str(ours_argv("OUT", False))))
    skipped = []
    for mode, name, skip in (("naive", "naive (load_file)", args.skip_naive), ("mecha", "sd-mecha", args.skip_mecha)):
        if skip:
            skipped.append(f"{name}: skipped (--skip-{mode})")
        elif avail < need[mode] + 2000:
            skipped.append(f"{name}: SKIPPED, memory short: {avail:.0f} MB available, needs about {need[mode]:.0f} MB"
                           " + 2 GB margin")
        else:
            fn, cmd = kid(mode, outs[mode])
            sides.append(C.Side(name, fn, cold(outs[mode]), done(name, mode), files=[a, b],
                                command=cmd.replace(str(outs[mode]), "OUT")))
    for s in skipped:
        log("  " + s)
    # ours takes the inputs' hashes (for the metadata) from the hash cache, as in use, where a model is hashed
    # once when it is first listed or merged: fill the bench's own cache once, untimed, so that every round of
    # "ours" reads each input once (a cold hash cache adds one read of each input, two files at a time, before
    # the merge; "ours --no-metadata" hashes nothing)
    t = time.perf_counter()
    C.run_command([C.PY, "-m", "lib_sdtoolkit", "hash", str(a), str(b), "--algo", "sha256,autov1", "--json"],
                  env=env, cwd=C.ROOT)
    log(f"  hash cache filled once before the rounds ({time.perf_counter() - t:.0f} s, untimed): ours reads each "
        f"input once per run")
    log(f"\n== merge {label}: 2 x {size_gb:.2f} GB fp16, weighted sum alpha {ALPHA}, cold cache "
        f"(inputs evicted before each run), {args.rounds} alternated rounds; load {C.loadavg()} ==")
    rc = C.alternate(sides, args.rounds, log)
    C.print_summary(rc, "seconds", title=f"merge {label} cold, whole command wall", ref="I/O floor", log=log)
    C.print_summary(rc, "inproc", title=f"merge {label} cold, in-process (after imports)", ref="I/O floor", log=log)
    C.print_summary(rc, "rss_mb", unit="MB", digits=0, title=f"merge {label} cold, peak RSS", log=log)
    rw = None
    if not args.no_warm:
        wsides = [C.Side("I/O floor", floor(outs["floor"]), hot(outs["floor"]), lambda m: rm(outs["floor"])(),
                         files=[a, b], command=floor_cmd.format(out="OUT")),
                  C.Side("ours", ours(outs["ours"]), hot(outs["ours"]), lambda m: rm(outs["ours"])(), files=[a, b],
                         command=C.cmd_str(ours_argv("OUT")))]
        log(f"\n== merge {label}: warm cache (inputs read once before each run) ==")
        rw = C.alternate(wsides, args.rounds, log)
        C.print_summary(rw, "seconds", title=f"merge {label} warm, whole command wall", ref="I/O floor", log=log)
        C.print_summary(rw, "inproc", title=f"merge {label} warm, in-process", ref="I/O floor", log=log)

    # equality and direction (from each side's last output, checked before it was deleted)
    ours_d = checks.get("ours", {}).get("digests", {})
    checks_txt = []
    for n, c in checks.items():
        dg = c["digests"]
        common = set(dg) & set(ours_d)
        same = sum(1 for k in common if dg[k] == ours_d[k])
        c["identical_to_ours"] = same
        log(f"  check {n}: {c['keys']} keys ({len(set(ours_d) - set(dg))} only in ours, {len(set(dg) - set(ours_d))} "
            f"only here), {same}/{len(common)} common keys bit-identical to ours; on {c['sample_keys']} sampled keys "
            f"max |out - fp16(A*0.7+B*0.3)| {c['max_abs_vs_expected']:.3g}, max |out - (A*0.3+B*0.7)| "
            f"{c['max_abs_vs_swapped']:.3g} -> {'same direction' if c['direction_ok'] else 'DIRECTION DIFFERS'}")
        if n != "ours":
            checks_txt.append(f"{n}: {same}/{len(common)} keys bit-identical to ours, sampled max|out-exact| "
                              f"{c['max_abs_vs_expected']:.2g}")
    dir_ok = bool(checks) and all(c["direction_ok"] for c in checks.values())
    check = (f"all {len(checks)} outputs take A*0.7+B*0.3 " if dir_ok else "DIRECTION MISMATCH ") + "; ".join(checks_txt)
    fsync = "fsync on every side"
    rows = []
    for s in rc.sides:
        if s.name == "I/O floor":
            continue
        rs = C.ratios(rc, s.name, "I/O floor", "seconds")
        tgt = C.target_text(C.med_min_max(rs)[0], 1.3) if s.name == "ours" else ""
        rows.append(C.row_for(rc, f"merge {label}", f"{s.name} vs I/O floor, whole command", s.name, "I/O floor",
                              "seconds", check, f"cold ({fsync})", s.command, target=tgt))
    rows.append(C.row_for(rc, f"merge {label}", "ours vs I/O floor, in-process", "ours", "I/O floor", "inproc",
                          check, f"cold ({fsync})", sides[1].command))
    for other in ("sd-mecha", "naive (load_file)"):
        if other in rc.results:
            rows.append(C.row_for(rc, f"merge {label}", f"ours vs {other}, whole command", "ours", other, "seconds",
                                  check, f"cold ({fsync})", sides[1].command))
            rows.append(C.row_for(rc, f"merge {label}", f"peak RSS ours vs {other}", "ours", other, "rss_mb",
                                  check, f"cold ({fsync})", sides[1].command, unit="MB", digits=0))
    if rw is not None:
        rs = C.ratios(rw, "ours", "I/O floor", "seconds")
        rows.append(C.row_for(rw, f"merge {label}", "ours vs I/O floor, whole command", "ours", "I/O floor",
                              "seconds", check, f"warm ({fsync})", sides[1].command,
                              target=C.target_text(C.med_min_max(rs)[0], 1.3)))
    for s in skipped:
        rows.append(C.Row(f"merge {label}", s.split(":")[0], "", "", "n/a", s, "", ""))
    for p in list(outs.values()) + [d / "sdtoolkit-history.jsonl"]:  # no output should be left: each is deleted
        rm(p)()                                                       # after its run; the CLI's history file
    import shutil

    shutil.rmtree(d / "cache", ignore_errors=True)
    if args.clean:
        for p in (a, b):
            rm(p)()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.size_arg(ap)
    ap.add_argument("--dir", default=None, help="where the input models live (default bench/models_merge)")
    ap.add_argument("--skip-mecha", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-nometa", action="store_true", help="leave out the 'ours --no-metadata' side")
    ap.add_argument("--no-warm", action="store_true", help="cold-cache rounds only")
    ap.add_argument("--only-model", help="run only this model pair (SD1.5 or SDXL)")
    ap.add_argument("--keep", action="store_true", help="(kept for compatibility; inputs are always kept)")
    ap.add_argument("--clean", action="store_true", help="delete the generated input models at the end (they are "
                    "kept by default, to be reused by the next run)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--digest", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(C.ROOT))
        print(json.dumps(child(*args.child)))
        return 0
    if args.digest:
        print(json.dumps(digest(*args.digest)))
        return 0
    d = Path(args.dir) if args.dir else C.bench_dir("models_merge")
    d.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"machine: {C.machine_facts(d)}")
    rows = []
    for label, arch, width in MODELS[args.size]:
        if args.only_model and label != args.only_model:
            continue
        a, b = ensure_models(d, label, arch, width, log)
        rows += bench_pair(label, a, b, d, args, log)
    C.emit_rows(rows, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
