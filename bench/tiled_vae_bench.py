"""Tiled VAE benchmark: peak memory and wall time of full vs. tiled decode, and the error against the full decode,
for our exact tiled decode and diffusers' ``enable_tiling()`` on the same (random, seeded) full-width SD VAE.

    python bench/tiled_vae_bench.py [--size tiny|mid|full] [--rounds 3]   # tiny 256 px, mid 512, full 512+1024
    python bench/tiled_vae_bench.py --sizes 512,1024 --with-4k --with-budget   # plus the bounded 4096 px run
    python bench/tiled_vae_bench.py --sizes 512,1024 --threads 1 --baseline-root /tmp/base   # before/after

``--baseline-root DIR``: one more side, "base tiled", runs the same tiled decode with ``lib_sdtoolkit`` imported
from DIR (e.g. ``git archive <commit> lib_sdtoolkit | tar -x -C DIR``), so before and after alternate in one run.
Besides wall seconds each child reports its CPU seconds (``time.process_time``, all its threads): on a loaded
machine (other processes competing for the cores) the CPU-time ratio is the steadier one; with ``--threads 1``
no thread spins waiting for another.

Full decode, our tiled decode and diffusers' tiled decode alternate over the rounds (each run its own child); the
summary gives median [min-max] per side and the per-round ratio to the full decode, and the last round's tiled
outputs are compared with the last round's full decode.

Each case runs in its own child process; peak memory is the child's peak RSS growth during the decode (VmHWM,
reset via /proc/self/clear_refs where the kernel allows, else minus the RSS before the decode). The full decode
is the reference (ldm ``Decoder.forward``, fp32). diffusers' tiled decode uses its SD1.5 defaults scaled to the
tile size given (overlap factor 0.25, linear blend). 4096 px: a full decode is far too slow on CPU (and its
naive attention alone would need 2 x 256 GiB), so the full decode's memory is extrapolated from the 512/1024
runs as a*P + b*P^2 (P pixels; the P^2 term is the attention score matrix), and ours runs *bounded*: every
checkpoint is allocated at full size and filled, but only one tile per pass is computed and the attention's
softmax(QK^T)V is skipped (k, v and the output are still allocated) -- its output is not an image, its peak
memory is that of a real run, since every tile of a pass has the same size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(width: str = "full"):
    import torch

    from lib_sdtoolkit.samples import factory
    torch.manual_seed(0)
    vae = factory.build_ldm_vae(width)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return vae


def _latent(px: int):
    import torch
    h = w = px // 8
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    field = torch.stack([torch.sin(3 * yy + c) * torch.cos(2 * xx - c) for c in range(4)])[None]
    return (field + torch.randn(1, 4, h, w, generator=g)) / 0.18215  # what the decoder sees: std ~5.5


def child(spec: dict, out_path: str) -> dict:
    if spec.get("root"):
        sys.path.insert(0, spec["root"])
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    vae = _build(spec.get("width", "full"))
    z = vae.post_quant_conv(_latent(spec["px"]))
    kind = spec["kind"]
    if kind.startswith("diffusers"):
        from lib_sdtoolkit.arch import keymaps
        from lib_sdtoolkit.samples import factory
        dv = factory.build_diffusers_vae(spec.get("width", "full"))
        dv.load_state_dict(keymaps.convert_vae_ldm_to_diffusers(vae.state_dict()), strict=True)
        del vae
        tile = spec["tile"]
        dv.enable_tiling()
        dv.tile_sample_min_size = tile
        dv.tile_latent_min_size = tile // 8
        dv.tile_overlap_factor = 0.25
        lat = _latent(spec["px"])
    base = _status("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    c0 = time.process_time()
    info = ""
    if kind == "full":
        img = vae.decoder(z)
    elif kind.startswith("diffusers"):
        img = dv.decode(lat).sample
    else:
        from lib_sdtoolkit.tiled_vae import TiledVAEConfig, plan_for, tiled_decode
        cfg = TiledVAEConfig(tile_px=spec.get("tile"), budget_bytes=(spec["budget_mb"] << 20) if spec.get("budget_mb") else None,
                             max_tiles_per_pass=1 if kind == "bounded" else None,
                             skip_attention_scores=kind == "bounded")
        plan = plan_for(vae.decoder, z.shape, cfg)
        info = plan.describe()
        img = tiled_decode(vae.decoder, z, cfg)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = _status("VmHWM")
    res = {"time_s": dt, "cpu_s": cpu, "peak_bytes": peak - base if not reset else max(0, peak - base), "hwm_reset": reset,
           "plan": info}
    if kind != "bounded":
        a = ((img[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        np.save(out_path, a.astype(np.float32))
    return res


def run_case(spec: dict, tmp: str) -> dict:
    out = os.path.join(tmp, f"{spec['name']}.npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["out"] = out if os.path.exists(out) else None
    return res


def compare(a_path: str, ref_path: str) -> str:
    import numpy as np
    a, r = np.load(a_path), np.load(ref_path)
    a8, r8 = np.round(a * 255).astype(np.int16), np.round(r * 255).astype(np.int16)
    d8 = np.abs(a8 - r8)
    mse = float(((a - r) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    return f"8-bit max |d| {int(d8.max())}/255, {100 * float((d8 > 1).mean()):.2f}% px > 1/255, PSNR {psnr:.1f} dB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="image sizes in px (default by --size: tiny 256, mid 512, "
                                                   "full 512,1024)")
    ap.add_argument("--no-4k", action="store_true", help="(default; kept for compatibility)")
    ap.add_argument("--with-4k", action="store_true", help="also the bounded 4096 px memory run")
    ap.add_argument("--with-budget", action="store_true", help="also a low-memory budget run per size")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (default: torch's)")
    ap.add_argument("--baseline-root", default=None,
                    help="also run the tiled decode of the lib_sdtoolkit found under this folder ('base tiled')")
    ap.add_argument("--tile", type=int, default=0, help="tile size in px (default: half the image side)")
    ap.add_argument("--budget-frac", type=float, default=0.125,
                    help="low-memory runs get this fraction of the full decode's measured peak as budget")
    ap.add_argument("--width", default=None, choices=["full", "tiny"], help="VAE width (default by --size)")
    C.size_arg(ap)
    ap.add_argument("--child")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child), a.out)))
        return 0
    width = a.width or ("tiny" if a.size == "tiny" else "full")
    sizes = [int(s) for s in (a.sizes or {"tiny": "256", "mid": "512", "full": "512,1024"}[a.size]).split(",") if s]
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"machine: {C.machine_facts()}")
    full_mem = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for px in sizes:
            tile = a.tile or px // 2

            def side(name, spec):
                spec = dict(spec, name=name.split()[0] + str(px), px=px, width=width, threads=a.threads)

                def run():
                    r = run_case(spec, tmp)
                    return {"seconds": r["time_s"], "cpu_s": r["cpu_s"], "peak_mb": r["peak_bytes"] / 2**20}
                return C.Side(name, run, command=f"python bench/tiled_vae_bench.py --sizes {px} --width {width} "
                                                 f"--rounds {a.rounds} --tile {tile}"
                                                 + (f" --threads {a.threads}" if a.threads else ""))

            sides = [side("full decode", {"kind": "full"}), side("ours tiled", {"kind": "ours", "tile": tile})]
            if a.baseline_root:
                sides.append(side("base tiled", {"kind": "ours", "tile": tile,
                                                 "root": os.path.abspath(a.baseline_root)}))
            if not a.no_diffusers:
                sides.append(side(f"diffusers tiled", {"kind": "diffusers", "tile": tile}))
            log(f"\n== {px}x{px} px (latent {px // 8}^2), VAE width {width}, fp32, CPU, tile {tile} px; "
                f"{a.rounds} alternated rounds, load {C.loadavg()} ==")
            r = C.alternate(sides, a.rounds, log)
            C.print_summary(r, "seconds", title="decode time", ref="full decode", log=log)
            C.print_summary(r, "cpu_s", title="decode CPU time (all threads)", ref="full decode", log=log)
            C.print_summary(r, "peak_mb", unit="MiB", digits=0, title="peak RSS growth", ref="full decode", log=log)
            ref = os.path.join(tmp, f"full{px}.npy")
            errs = {}
            for s in sides[1:]:
                o = os.path.join(tmp, f"{s.name.split()[0]}{px}.npy")
                errs[s.name] = compare(o, ref) if os.path.exists(o) and os.path.exists(ref) else "no output"
                log(f"  check {s.name} vs full decode (last round): {errs[s.name]}")
            full_mem[px] = C.med_min_max(r.values("full decode", "peak_mb"))[0] * 2**20
            for s in sides[1:]:
                rs = C.ratios(r, s.name, "full decode", "seconds")
                tgt = C.target_text(C.med_min_max(rs)[0], 1.1) if s.name == "ours tiled" else ""
                rows.append(C.row_for(r, f"tiled VAE {px} px", f"{s.name} vs full decode, time", s.name,
                                      "full decode", "seconds", errs[s.name], "in RAM", s.command, target=tgt))
                rows.append(C.row_for(r, f"tiled VAE {px} px", f"{s.name} vs full decode, CPU time", s.name,
                                      "full decode", "cpu_s", errs[s.name], "in RAM", s.command))
                rows.append(C.row_for(r, f"tiled VAE {px} px", f"{s.name} vs full decode, peak RSS growth", s.name,
                                      "full decode", "peak_mb", errs[s.name], "in RAM", s.command, unit="MiB",
                                      digits=0))
            if a.with_budget:
                budget = max(64, int(full_mem[px] * a.budget_frac) >> 20)
                rb = run_case({"name": f"ours{px}_{budget}", "kind": "ours", "tile": tile, "budget_mb": budget,
                               "px": px, "width": width}, tmp)
                log(f"ours tiled (budget {budget} MiB): {rb['time_s']:.1f} s, peak +{rb['peak_bytes'] / 2**20:.0f} MiB"
                    f"  {compare(rb['out'], ref) if rb['out'] else ''}\n    {rb['plan']}")
        if a.with_4k and len(full_mem) >= 2:
            (p1, m1), (p2, m2) = sorted(full_mem.items())[:2]
            P1, P2 = p1 * p1, p2 * p2
            # m = a*P + b*P^2 through both points
            b = max(0.0, (m2 / P2 - m1 / P1) / (P2 - P1))
            aa = m1 / P1 - b * P1 if b > 0 else m2 / P2
            P4 = 4096 * 4096
            est_total, est_linear = aa * P4 + b * P4 * P4, aa * P4
            budget = int(est_linear / 8 * 0.75) >> 20
            log(f"\n== 4096x4096 px: full decode estimate {est_total / 2**30:.1f} GiB "
                f"(conv path {est_linear / 2**30:.1f} GiB + naive attention {b * P4 * P4 / 2**30:.1f} GiB) ==")
            r = run_case({"name": "bounded4k", "kind": "bounded", "px": 4096, "tile": 512, "budget_mb": budget,
                          "width": width}, tmp)
            log(f"ours tiled, bounded run (budget {budget} MiB): peak +{r['peak_bytes'] / 2**30:.2f} GiB = "
                f"1/{est_linear / max(1, r['peak_bytes']):.1f} of the conv-path estimate, "
                f"1/{est_total / max(1, r['peak_bytes']):.0f} of the total estimate ({r['time_s']:.0f} s bounded)")
            log(f"    {r['plan']}")
    C.emit_rows(rows, a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
