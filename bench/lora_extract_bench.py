"""Whole ``lora extract`` of a full-size SD1.5 fine-tune difference: randomised vs exact SVD, time and error.

    python bench/lora_extract_bench.py [--dir DIR] [--rank 32] [--conv-rank R] [--rounds 3] [--threads 2] [--keep]

Builds two full-size SD1.5 checkpoints (fp16, real key layout and shapes, streamed one tensor at a time): a random
base (``factory.write_checkpoint``) and a "fine-tune" = base + ΔW on every layer extract reads, where ΔW has a
fine-tune's kind of spectrum: a low-rank part (rank 16, singular values decaying i^-1, norm 2 % of the layer's)
plus dense noise at 3 % of its norm, the tuned file stored in fp16 like the base (its rounding adds more noise),
so nothing is exactly low-rank and the truncation has a real tail. Then it runs
``extract_lora(..., svd="randomized")`` and ``extract_lora(..., svd="full")`` as in-process calls, alternating the
order over ``--rounds`` rounds, and prints per round each side's seconds and the load average, then median [min-max]
per side and the per-round ratio.

Error, from the written files (fp16 factors, as the WebUI reads them), per layer against the exact ΔW read back
from the two checkpoints:

* ``rand/exact``: ‖ΔW − up·down‖_F of the randomised file divided by that of the exact file (1 = optimal truncation);
* ``excess``: (‖ΔW − rand‖ − ‖ΔW − exact‖) / ‖ΔW‖, the randomised file's extra error in units of ΔW, against
  fp16's eps;
* ``|rand − exact| / |exact|``: ‖up·down(rand) − up·down(exact)‖_F / ‖up·down(exact)‖_F, printed beside
  the fp16 rounding of the exact factors themselves (‖fp16 product − fp32 product‖ / ‖product‖) and fp16's eps
  (2^-11 = 4.9e-4): the randomised result is as good as the exact one when its distance is at that level.

``--per-shape``: instead, one layer of each distinct shape, ``lowrank.truncated`` both ways in-process (CPU seconds
and the same error figures) -- minutes where the whole alternated extract takes long on a busy machine.

Files go to ``--dir`` (default a temp folder under bench/) and are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FP16_EPS = 2.0 ** -11


def _gen(key: str, seed: int):
    import torch
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h)


def fine_tune_delta(key: str, shape, norm: float, seed: int = 1, rank: int = 16, noise: float = 0.03):
    """ΔW for one weight: rank-``rank`` part with singular values ∝ 1/i and Frobenius norm ``norm``, plus dense
    Gaussian noise with ``noise`` times its norm."""
    import torch
    g = _gen(key, seed)
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    r = min(rank, m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -1.0
    s *= norm / float(s.norm())
    low = (u * s) @ v.T
    e = torch.randn(m, n, generator=g)
    e *= noise * float(low.norm()) / float(e.norm())
    return (low + e).reshape(shape)


def extract_keys(arch: str = "SD1", conv: bool = False):
    """The weight keys ``extract_lora`` reads (with its default targets, or also the convs)."""
    from lib_sdtoolkit.lora.extract import _is_attention, _targets
    keys = set()
    for _, t in _targets(arch):
        if _is_attention(t.module) or conv:
            keys.add(t.weight_key)
    return keys


def build_pair(d: Path, conv: bool, log) -> tuple:
    import torch

    from lib_sdtoolkit.files import StreamingSafetensorsWriter, open_model
    from lib_sdtoolkit.samples import factory
    base, tuned = d / "sd15-base.safetensors", d / "sd15-tuned.safetensors"
    if not base.exists():
        t = time.perf_counter()
        factory.write_checkpoint(base, "SD1", width="full", dtype=torch.float16, seed=0)
        log(f"wrote {base} ({base.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    if not tuned.exists():
        t = time.perf_counter()
        keys = extract_keys("SD1", conv)
        with open_model(base) as rb:
            specs = [(k, rb.info(k).dtype, tuple(rb.info(k).shape)) for k in rb.keys()]
            with StreamingSafetensorsWriter(tuned, specs, {"sdtoolkit_bench": "fine-tune of sd15-base"}) as w:
                for k, dt, shape in specs:
                    x = rb.get(k)
                    if k in keys:  # a fine-tune moves a layer by ~2 % of its norm
                        x = (x.float() + fine_tune_delta(k, shape, 0.02 * float(x.float().norm()))).to(dt)
                    w.write(k, x)
        log(f"wrote {tuned} ({len(keys)} layers changed) in {time.perf_counter() - t:.0f} s")
    return tuned, base


def errors(tuned: Path, base: Path, rand: Path, full: Path):
    """Per-layer error figures (see the module docstring); returns a list of dicts."""
    import torch

    from lib_sdtoolkit.files import open_model
    from lib_sdtoolkit.lora.extract import _targets
    name_to_t = {n: t for n, t in _targets("SD1")}
    out = []
    with open_model(tuned) as rt, open_model(base) as rb, open_model(rand) as fr, open_model(full) as ff:
        for k in fr.keys():
            if not k.endswith(".lora_up.weight"):
                continue
            name = k[: -len(".lora_up.weight")]
            t = name_to_t[name]
            a, b = rt.get(t.weight_key).float(), rb.get(t.weight_key).float()
            if t.qkv_index is not None:
                n = a.shape[0] // 3
                a, b = a[t.qkv_index * n:(t.qkv_index + 1) * n], b[t.qkv_index * n:(t.qkv_index + 1) * n]
            dw = (a - b).reshape(a.shape[0], -1).double()

            def prod(f):
                up = f.get(name + ".lora_up.weight").double()
                down = f.get(name + ".lora_down.weight").double()
                return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            pr, pf = prod(fr), prod(ff)
            res_r, res_f = float((dw - pr).norm()), float((dw - pf).norm())
            # the exact SVD's own factors in fp32 vs fp16: the output dtype's rounding of the exact answer
            u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)
            r = fr.get(name + ".lora_up.weight").shape[1]
            up32, dn32 = (u[:, :r] * s[:r]), vh[:r]
            p32 = up32.double() @ dn32.double()
            p16 = up32.half().double() @ dn32.half().double()
            out.append({"name": name, "shape": tuple(dw.shape), "rank": r,
                        "rand_over_exact": res_r / max(res_f, 1e-30),
                        "excess": (res_r - res_f) / max(float(dw.norm()), 1e-30),
                        "dist": float((pr - pf).norm()) / max(float(pf.norm()), 1e-30),
                        "fp16_rounding": float((p16 - p32).norm()) / max(float(p32.norm()), 1e-30),
                        "exact_vs_fp32": float((pf - p32).norm()) / max(float(p32.norm()), 1e-30)})
    return out


def shape_errors(tuned: Path, base: Path, rank: int, conv: bool, log) -> None:
    """One layer of each distinct shape: ``lowrank.truncated`` randomised vs exact on the real ΔW of the two files,
    CPU seconds of each, and the same error figures as :func:`errors` (factors rounded to fp16 as written)."""
    import torch

    from lib_sdtoolkit.files import open_model
    from lib_sdtoolkit.lora import lowrank
    from lib_sdtoolkit.lora.extract import _is_attention, _targets
    seen = set()
    log(f"{'layer':<58} {'shape':>12} {'rand CPU s':>10} {'exact CPU s':>11} {'rand/exact':>10} {'excess':>9} "
        f"{'|r-e|/|e|':>9} {'fp16 rnd':>9}")
    with open_model(tuned) as rt, open_model(base) as rb:
        for name, t in _targets("SD1"):
            if not (_is_attention(t.module) or conv) or t.weight_key not in rb:
                continue
            a, b = rt.get(t.weight_key).float(), rb.get(t.weight_key).float()
            if t.qkv_index is not None:
                n = a.shape[0] // 3
                a, b = a[t.qkv_index * n:(t.qkv_index + 1) * n], b[t.qkv_index * n:(t.qkv_index + 1) * n]
            dw = (a - b).reshape(a.shape[0], -1)
            if tuple(dw.shape) in seen:
                continue
            seen.add(tuple(dw.shape))
            res = {}
            for mode in ("randomized", "full"):
                c = time.process_time()
                tr = lowrank.truncated(dw, rank, mode=mode)
                res[mode] = (time.process_time() - c, tr.up.half().double() @ tr.down.half().double(),
                             tr.up.double() @ tr.down.double())
            d64 = dw.double()
            nr, ne = float((d64 - res["randomized"][1]).norm()), float((d64 - res["full"][1]).norm())
            pe = res["full"][1]
            log(f"{name:<58} {'x'.join(map(str, dw.shape)):>12} {res['randomized'][0]:>10.3f} {res['full'][0]:>11.3f} "
                f"{nr / ne:>10.6f} {(nr - ne) / float(d64.norm()):>9.1e} "
                f"{float((res['randomized'][1] - pe).norm()) / float(pe.norm()):>9.1e} "
                f"{float((res['full'][1] - res['full'][2]).norm()) / float(res['full'][2].norm()):>9.1e}")
    log(f"(fp16 eps {FP16_EPS:.1e}; excess = (|dW - rand| - |dW - exact|) / |dW|)")


def _mmm(xs):
    return f"median {statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--conv-rank", type=int, default=None, help="also the ResNet/sampler layers at this rank")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default="randomized,full", help="which svd modes to time (comma-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    ap.add_argument("--per-shape", action="store_true",
                    help="only the per-shape comparison (one layer of each shape, in-process truncations)")
    a = ap.parse_args(argv)
    import torch

    from lib_sdtoolkit.lora.extract import extract_lora
    torch.set_num_threads(a.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="extract-bench-", dir=ROOT / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        tuned, base = build_pair(d, a.conv_rank is not None, log)
        if a.per_shape:
            shape_errors(tuned, base, a.rank, a.conv_rank is not None, log)
            return 0
        sides = [s.strip() for s in a.sides.split(",") if s.strip()]
        log(f"extract rank {a.rank}, conv rank {a.conv_rank}, {a.threads} threads, sides {sides}, "
            f"{a.rounds} alternated rounds; load {os.getloadavg()}")
        times = {s: [] for s in sides}
        cpu = {s: [] for s in sides}
        outs = {}
        for rnd in range(a.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for s in order:
                out = d / f"lora-{s}.safetensors"
                la = "%.2f %.2f %.2f" % os.getloadavg()
                t, c = time.perf_counter(), time.process_time()
                rep = extract_lora(tuned, base, out, rank=a.rank, conv_rank=a.conv_rank, svd=s, overwrite=True)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                times[s].append(dt)
                cpu[s].append(dc)
                outs[s] = out
                methods = sorted({x["svd"] for x in rep["layer_report"]})
                log(f"  round {rnd + 1} {s:>10}: {dt:7.1f} s wall, {dc:7.1f} s CPU  ({rep['layers']} layers, svd {methods}, "
                    f"min kept energy {rep['min_energy']:.4f}) load before {la}")
        for s in sides:
            log(f"{s:>10}: wall {_mmm(times[s])} s, CPU (all threads) {_mmm(cpu[s])} s")
        if "randomized" in times and "full" in times:
            n = min(len(times["randomized"]), len(times["full"]))
            rs = [times["randomized"][i] / times["full"][i] for i in range(n)]
            log(f"randomized/full per round (wall): {', '.join(f'{r:.3f}' for r in rs)} "
                f"(median {statistics.median(rs):.3f})")
            rc = [cpu["randomized"][i] / cpu["full"][i] for i in range(n)]
            log(f"randomized/full per round (CPU): {', '.join(f'{r:.3f}' for r in rc)} "
                f"(median {statistics.median(rc):.3f})")
            errs = errors(tuned, base, outs["randomized"], outs["full"])
            worst = max(errs, key=lambda e: e["rand_over_exact"])
            far = max(errs, key=lambda e: e["dist"])
            log(f"error over {len(errs)} layers: residual rand/exact median "
                f"{statistics.median(e['rand_over_exact'] for e in errs):.6f}, max {worst['rand_over_exact']:.6f} "
                f"({worst['name']} {worst['shape']})")
            log(f"  excess residual (|dW - rand| - |dW - exact|) / |dW|: median "
                f"{statistics.median(e['excess'] for e in errs):.2e}, max {max(e['excess'] for e in errs):.2e} "
                f"(fp16 eps {FP16_EPS:.2e})")
            log(f"  |rand - exact| / |exact| median {statistics.median(e['dist'] for e in errs):.2e}, max "
                f"{far['dist']:.2e} ({far['name']} {far['shape']}); fp16 rounding of the exact factors median "
                f"{statistics.median(e['fp16_rounding'] for e in errs):.2e}, max "
                f"{max(e['fp16_rounding'] for e in errs):.2e}; fp16 eps {FP16_EPS:.2e}")
            log(f"  exact file vs fp32 exact product: max {max(e['exact_vs_fp32'] for e in errs):.2e}")
            over = [e for e in errs if e["dist"] > FP16_EPS]
            log(f"  layers where the randomised product is farther than fp16 eps from the exact one: {len(over)}"
                + (f" (e.g. {over[0]['name']} {over[0]['dist']:.2e})" if over else ""))
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
