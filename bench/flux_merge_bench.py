"""Flux.1 merge benchmark: ours vs the I/O floor at Flux width, with peak RSS, as whole commands.

    python bench/flux_merge_bench.py [--max-gb 3] [--rounds 3] [--dir DIR] [--skip-nometa] [--keep]

Inputs: two BFL-layout Flux.1-dev transformers (bare ``double_blocks.N`` / ``single_blocks.N`` keys), bf16 random
weights with the real names and full-size shapes (hidden 3072, fused qkv 9216 rows, single-block ``linear1``
21504 rows, ``linear2`` 15360 columns, MLP 12288). Names and shapes come from sd-mecha's shipped
``flux-flux.yaml`` when sd-mecha is installed, else from :func:`lib_sdtoolkit.samples.flux.bfl_specs` (checked
equal to that list in tests/test_flux_arch.py). A full transformer is 23.8 GB, so the files keep every key outside
the blocks (the embedders, ``final_layer``), and as many double and single blocks as fit in ``--max-gb`` (same
proportion of double to single blocks as the full model, at least one of each); the merge is then scaled to the
full model by bytes. Files are written once into ``--dir`` (default ``bench/models_flux``, git-ignored) and deleted
at the end unless ``--keep``.

Every side does the same work: weighted sum alpha 0.3 (``A*0.7 + B*0.3``), fp32 maths, bf16 output, the output
fsynced before the command returns:

* I/O floor: ``cat A B >/dev/null; cp A OUT; sync OUT``;
* ours: ``python -m lib_sdtoolkit merge A B -o OUT --alpha 0.3 --dtype bf16 --json``; the sha256 of the inputs
  for the metadata come from the hash cache, which the bench fills once before the rounds (untimed, ``python -m
  lib_sdtoolkit hash A B``), so each run reads each input once (a cold hash cache adds one read of each input
  before the merge);
* ours --no-metadata: the same without hashing.

Cold cache: before each run the inputs are fsynced and dropped from the page cache (``posix_fadvise(DONTNEED)``);
the residency just before the start is printed. Sides alternate over ``--rounds`` rounds; the summary gives
median / min / max per side and per-round ratios, peak RSS and the command's CPU seconds from ``/usr/bin/time``,
and the machine's CPU seconds over each run from ``/proc/stat`` (busy, waiting = idle + iowait, steal): a side
whose cores mostly wait is held up by the disk, not by its own work. Each output is deleted right
after its run; ours's last output is first checked on a sample of keys against ``(A*0.7 + B*0.3)`` in fp32 rounded
to bf16. The bench's hash cache and history file are deleted at the end.

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
FULL_FLUX_BYTES = 23.8e9
DOUBLE, SINGLE = 19, 38


# ----------------------------------------------------------------------------------------------- children
def full_specs() -> tuple:
    """([(key, shape)] of the full BFL dev transformer, where the names came from)."""
    import importlib.util

    spec = importlib.util.find_spec("sd_mecha")
    if spec is not None and spec.submodule_search_locations:
        p = (Path(list(spec.submodule_search_locations)[0]) / "extensions" / "builtin" / "model_configs"
             / "flux-flux.yaml")
        if p.exists():
            import yaml

            with open(p, encoding="utf-8") as f:
                comps = yaml.safe_load(f)["components"]
            pre = "model.diffusion_model."
            keys = [(k[len(pre):], tuple(v["shape"])) for k, v in comps["diffuser"].items() if k.startswith(pre)]
            return keys, f"sd-mecha {p.name}"
    sys.path.insert(0, str(C.ROOT))
    from lib_sdtoolkit.samples import flux

    return flux.bfl_specs("full", "dev"), "lib_sdtoolkit.samples.flux.bfl_specs (sd-mecha not installed)"


def _numel(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def pick(max_bytes: float) -> tuple:
    """The keys of a cut Flux: every non-block key, then double/single blocks in the full model's 1:2 proportion
    while the file stays under ``max_bytes`` (bf16)."""
    keys, src = full_specs()

    def blk(k):
        parts = k.split(".")
        return (parts[0], int(parts[1])) if parts[0] in ("double_blocks", "single_blocks") else None

    size = {}
    for k, s in keys:
        b = blk(k)
        size[b] = size.get(b, 0) + 2 * _numel(s)
    total = size[None]
    nd = ns = 0
    while True:
        want_d = nd + 1 if (nd + 1) * 2 <= ns + 2 else nd
        want_s = ns + 1 if want_d == nd else ns
        add = size[("double_blocks", nd)] if want_d > nd else size[("single_blocks", ns)]
        if (nd and ns and total + add > max_bytes) or want_d > DOUBLE or want_s > SINGLE:
            break
        total += add
        nd, ns = want_d, want_s
    kept = [(k, s) for k, s in keys if blk(k) is None or (blk(k)[0] == "double_blocks" and blk(k)[1] < nd)
            or (blk(k)[0] == "single_blocks" and blk(k)[1] < ns)]
    full = sum(size.values())
    return kept, nd, ns, total, full, src


def write_model(path: str, max_gb: float, seed: int) -> dict:
    import torch

    sys.path.insert(0, str(C.ROOT))
    from lib_sdtoolkit.files import StreamingSafetensorsWriter

    kept, nd, ns, total, full, src = pick(max_gb * 1e9)
    g = torch.Generator().manual_seed(seed)
    specs = [(k, torch.bfloat16, s) for k, s in kept]
    meta = {"sdtoolkit.bench": f"Flux.1-dev cut to {nd} double + {ns} single blocks, seed {seed}"}
    info = {"double": nd, "single": ns, "bytes": total, "full_bytes": full, "keys": len(kept), "source": src}
    if Path(path).exists():  # kept from an earlier run (--keep): reused if it is the file this run would write
        from lib_sdtoolkit.files import open_model

        with open_model(path) as r:
            same = r.metadata == meta and [(i.name, tuple(i.shape), i.dtype) for i in r.infos().values()] == \
                [(k, tuple(s), torch.bfloat16) for k, s in kept]
        if same:
            return dict(info, reused=True)
    with StreamingSafetensorsWriter(path, specs, meta, overwrite=True) as w:  # the bench's own file, rewritten
        for k, s in kept:
            w.write(k, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16))
    return info


def check(a: str, b: str, out: str) -> dict:
    import torch
    from safetensors import safe_open

    fa, fb, fo = safe_open(a, "pt"), safe_open(b, "pt"), safe_open(out, "pt")
    keys = list(fa.keys())
    sample = keys[:: max(1, len(keys) // 40)]
    worst = swapped = 0.0
    for k in sample:
        ta, tb, to = fa.get_tensor(k).float(), fb.get_tensor(k).float(), fo.get_tensor(k)
        want = (ta * (1 - ALPHA) + tb * ALPHA).to(torch.bfloat16)
        worst = max(worst, float((to.float() - want.float()).abs().max()))
        swapped = max(swapped, float((to.float() - (ta * ALPHA + tb * (1 - ALPHA))).abs().max()))
    return {"sample_keys": len(sample), "keys": len(keys), "out_keys": len(list(fo.keys())),
            "max_abs_vs_expected": worst, "max_abs_vs_swapped": swapped, "dtype": str(fo.get_tensor(keys[0]).dtype)}


# ----------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-gb", type=float, default=3.0, help="largest input file, GB (default 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the inputs are written (default bench/models_flux)")
    ap.add_argument("--skip-nometa", action="store_true", help="leave out the 'ours --no-metadata' side")
    ap.add_argument("--keep", action="store_true", help="keep the input files")
    ap.add_argument("--rows", default=None, help="append result rows (JSON lines) to this file")
    ap.add_argument("--child-write", nargs=3, metavar=("PATH", "MAX_GB", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--child-check", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_write:
        print(json.dumps(write_model(args.child_write[0], float(args.child_write[1]), int(args.child_write[2]))))
        return 0
    if args.child_check:
        print(json.dumps(check(*args.child_check)))
        return 0
    d = Path(args.dir) if args.dir else C.bench_dir("models_flux")
    d.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"machine: {C.machine_facts(d)}")
    a, b = d / "flux-cut-a.safetensors", d / "flux-cut-b.safetensors"
    info = None
    for seed, p in enumerate((a, b)):
        t = time.perf_counter()
        r = C.run_command([C.PY, str(Path(__file__).resolve()), "--child-write", str(p), str(args.max_gb), str(seed)],
                          env=C.torch_free_env(), cwd=C.ROOT)
        info = C.last_json(r["stdout"])
        log(f"{'reused' if info.get('reused') else 'wrote'} {p.name}: {info['double']} double + {info['single']} "
            f"single blocks, {info['keys']} keys, {p.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s "
            f"(names/shapes: {info['source']})")
    size = a.stat().st_size
    outs = {n: d / f"out-{n}.safetensors" for n in ("floor", "ours", "nometa")}
    env = C.torch_free_env()
    env["SDTOOLKIT_CACHE_DIR"] = str(d / "cache")
    env["SDTOOLKIT_MERGE_STATS"] = "1"  # ours prints where its time went (stderr), logged with each round
    env = C.bytecode_env(env, d / "cache" / "pycache")  # ours starts from bytecode, as an installed copy does

    def cold(p):
        def f():
            if p.exists():
                p.unlink()
            C.evict([a, b])
        return f

    floor_cmd = f"cat {a} {b} >/dev/null; cp {a} {{out}}; sync {{out}}"

    def floor(out):
        def f():
            r = C.run_command(floor_cmd.format(out=out), shell=True)
            return {"seconds": r["wall"], "rss_mb": r["rss_mb"], **C.cpu_fields(r)}
        return f

    def ours_argv(out, meta=True):
        return [C.PY, "-m", "lib_sdtoolkit", "merge", str(a), str(b), "-o", str(out), "--alpha", str(ALPHA),
                "--dtype", "bf16", "--json"] + ([] if meta else ["--no-metadata"])

    C.run_command([C.PY, "-m", "lib_sdtoolkit", "hash", str(a), str(b), "--algo", "sha256,autov1", "--json"],
                  env=env, cwd=C.ROOT)  # the hash cache, filled once (untimed)
    runs = {}
    chk_box = {}

    def done(name, p):
        def f(m):
            runs[name] = runs.get(name, 0) + 1
            try:
                if name == "ours" and runs[name] == args.rounds and p.exists():
                    chk_box["chk"] = C.last_json(C.run_command(
                        [C.PY, str(Path(__file__).resolve()), "--child-check", str(a), str(b), str(p)],
                        env=env, cwd=C.ROOT)["stdout"])
            finally:
                if p.exists():
                    p.unlink()
        return f

    def ours(out, meta=True):
        def f():
            r = C.run_command(ours_argv(out, meta), env=env, cwd=C.ROOT)
            rep = json.loads(r["stdout"])
            split = C.merge_stats(r["stderr"])
            assert rep["architecture"] == "Flux.1", rep["architecture"]
            return {"seconds": r["wall"], "inproc": rep["seconds"], "rss_mb": r["rss_mb"], **C.cpu_fields(r), **split}
        return f

    sides = [C.Side("I/O floor", floor(outs["floor"]), cold(outs["floor"]), done("I/O floor", outs["floor"]),
                    files=[a, b], command=floor_cmd.format(out="OUT")),
             C.Side("ours", ours(outs["ours"]), cold(outs["ours"]), done("ours", outs["ours"]), files=[a, b],
                    command=C.cmd_str(ours_argv("OUT")))]
    if not args.skip_nometa:
        sides.append(C.Side("ours --no-metadata", ours(outs["nometa"], False), cold(outs["nometa"]),
                            done("ours --no-metadata", outs["nometa"]), files=[a, b],
                            command=C.cmd_str(ours_argv("OUT", False))))
    label = f"Flux.1 {info['double']}D+{info['single']}S"
    log(f"\n== merge {label}: 2 x {size / 1e9:.2f} GB bf16 (hidden 3072), weighted sum alpha {ALPHA}, bf16 out, "
        f"cold cache, fsync on every side, {args.rounds} alternated rounds; load {C.loadavg()} ==")
    try:
        rc = C.alternate(sides, args.rounds, log)
        C.print_summary(rc, "seconds", title=f"merge {label} cold, whole command wall", ref="I/O floor", log=log)
        for r in rc.results["I/O floor"]:
            r.setdefault("inproc", r["seconds"])  # the floor has no start-up
        C.print_summary(rc, "inproc", title=f"merge {label} cold, in-process (after imports)", ref="I/O floor", log=log)
        C.print_summary(rc, "rss_mb", unit="MB", digits=0, title=f"merge {label} cold, peak RSS", log=log)
        ncpu = os.cpu_count() or 1
        log(f"merge {label} cold, where the CPU time went (the command's own, and the machine's {ncpu} cores over "
            f"the run: waiting = idle + iowait, steal = taken by the hypervisor)")
        for s in rc.sides:
            parts = []
            for key, what in (("cpu_s", "command CPU"), ("m_busy", "machine busy"), ("m_wait", "waiting"),
                              ("m_steal", "steal")):
                vals = rc.values(s.name, key)
                if vals and all(v == v for v in vals):
                    parts.append(f"{what} {C.med_min_max(vals)[0]:.1f} s")
            log(f"  {s.name:34s} " + ", ".join(parts) + " (medians)")
        chk = chk_box["chk"]
        log(f"  check: {chk['out_keys']}/{chk['keys']} keys, {chk['dtype']}; on {chk['sample_keys']} sampled keys max "
            f"|out - bf16(A*0.7+B*0.3)| {chk['max_abs_vs_expected']:.3g} (swapped A*0.3+B*0.7: "
            f"{chk['max_abs_vs_swapped']:.3g})")
        # full-size Flux, scaled by bytes from the median per-byte times
        scale = FULL_FLUX_BYTES / size
        # in-process times scale with the bytes; the start-up (python + torch imports) does not, so it is added
        # once, not multiplied
        log(f"\n== extrapolated to full-size Flux.1 (23.8 GB bf16 per input; x{scale:.2f} the bytes; start-up "
            f"added once) ==")
        for s in rc.sides:
            med, lo, hi = C.med_min_max(rc.values(s.name, "inproc"))
            st = C.med_min_max([w - i for w, i in zip(rc.values(s.name, "seconds"), rc.values(s.name, "inproc"))])[0]
            log(f"  {s.name:22s} {med * scale + st:8.0f} s  (min {lo * scale + st:.0f}, max {hi * scale + st:.0f}; "
                f"start-up {st:.1f} s)")
        rs = C.ratios(rc, "ours", "I/O floor", "inproc")
        log(f"  in-process ratio ours / I/O floor per round: {C.fmt_ratio(rs)} -> "
            f"{C.target_text(C.med_min_max(rs)[0], 1.3)}; "
            "(peak RSS is bounded by the largest tensors in flight, not by the file size)")
        check_text = (f"max|out - bf16(A*0.7+B*0.3)| {chk['max_abs_vs_expected']:.2g} on {chk['sample_keys']} keys")
        rows = [C.row_for(rc, f"merge {label}", f"{s.name} vs I/O floor, whole command", s.name, "I/O floor",
                          "seconds", check_text, "cold (fsync on every side)", s.command,
                          target=C.target_text(C.med_min_max(C.ratios(rc, s.name, "I/O floor", "seconds"))[0], 1.3))
                for s in rc.sides if s.name != "I/O floor"]
        C.emit_rows(rows, args.rows)
    finally:
        import shutil

        for p in list(outs.values()) + [d / "sdtoolkit-history.jsonl"]:
            if p.exists():
                p.unlink()
        shutil.rmtree(d / "cache", ignore_errors=True)
        if not args.keep:
            for p in (a, b):
                if p.exists():
                    p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
