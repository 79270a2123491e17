"""LoRA apply/switch/re-apply/restore cost and memory: lib_sdtoolkit.lora vs diffusers load_lora_weights + fuse.

Full-width SD1.5 UNet + CLIP-L text encoder with random weights (nothing downloaded), two rank-64 kohya LoRAs over all
attention, feed-forward and ResNet/sampler conv layers. Ours patches the real ldm UNetModel + transformers CLIP;
diffusers patches the equivalent UNet2DConditionModel (the same weights, converted) + the same CLIP through PEFT
(``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` = what ``pipe.load_lora_weights``
calls, then ``fuse_lora``).

    python bench/lora_bench.py [--device cpu] [--dtype fp16|fp32|bf16] [--rank 64] [--width full|mid|tiny]
                               [--repeat 3 | --rounds 3] [--size tiny|mid|full]

``--width mid`` = the full SD1.5 layout at half the UNet channels (160 instead of 320; same CLIP-L). ``--size``
picks the width (tiny / mid / full) when ``--width`` is not given. ``--repeat`` and ``--rounds`` are the same: the
number of alternated rounds.

Equal work, measured the same way on both sides. Each side runs in its own child process per round (ours and
diffusers alternating, the order rotating); the model is built first, then the peak RSS is reset
(``/proc/self/clear_refs``) and the base RSS taken; every phase's file reading is inside the measured window on both
sides. Phases:

1. apply: read LoRA 1 from disk + patch (ours: ``load_network`` + ``set_networks``; diffusers: load + fuse);
2. switch: to LoRA 2 (ours: ``load_network`` + ``set_networks``; diffusers: ``unfuse_lora``, delete adapter 1,
   load + fuse LoRA 2);
3. same set again (like with like): ours ``set_networks`` with the same set is answered from its cache; a caller
   of diffusers compares the asked set with the fused one and does nothing;
4. same LoRA, new weight (equal work): ours ``set_networks`` with multiplier 0.8; diffusers ``unfuse_lora``,
   ``set_adapters(weights=0.8)``, ``fuse_lora``;
5. restore: ours ``restore_all``; diffusers ``unfuse_lora`` + delete the adapter. Then every parameter is compared
   with its value before phase 1 (sha1 of its bytes): "exact" when all are bit-identical.

Our sides, one per backup kind (``--backups file,spill,ram``): ``file`` reads the originals back from the fp16
checkpoint the weights came from (written before the window; the model's values are fp16-representable on every
side), ``spill`` writes them to a temporary file in the bench folder, ``ram`` keeps them in memory (the old way).

Memory (same source on every side): peak RSS growth over the base (VmHWM - VmRSS before phase 1, cumulative over
phases 1-4) and the resident growth after phase 4 (VmRSS). Outputs checked equal: after phase 1 both sides run the
UNet (8x8 latent) and the text encoder on the same seeded inputs; the max abs difference between ours and diffusers is
printed beside the LoRA's own effect (max abs difference from the unpatched outputs).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DTYPES = ("fp16", "fp32", "bf16")


# ----------------------------------------------------------------------------------------------- child
def _torch_dtype(name):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _randomize(m, dev, dtype, seed):
    import torch

    m = m.to_empty(device=dev)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            # fp16-representable values (as loaded from an fp16 checkpoint), the same on every side
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).half().float())
    return m.to(dtype)


def build_unet(width: str, diffusers: bool):
    """UNet on the meta device; ``mid`` = full layout with half the channels."""
    import torch
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from lib_sdtoolkit.samples import factory

    if width != "mid":
        if diffusers:
            return factory.build_diffusers_unet("SD1", width, device="meta")
        return factory.build_ldm_unet("SD1", width, device="meta")
    cfg = factory.get_config("SD1", "full")
    with torch.device("meta"):
        if diffusers:
            from diffusers import UNet2DConditionModel

            kw = dict(cfg.diffusers_unet)
            kw["block_out_channels"] = tuple(c // 2 for c in kw["block_out_channels"])
            return UNet2DConditionModel(**kw).eval()
        kw = dict(cfg.ldm_unet)
        kw["model_channels"] //= 2
        return UNetModel(**kw).eval()


def _fingerprint(*mods) -> dict:
    import torch

    out = {}
    for i, m in enumerate(mods):
        for n, p in m.named_parameters():
            t = p.detach().contiguous().cpu()
            out[f"{i}.{n}"] = hashlib.sha1(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    return out


def _fuse_te(te, fuse: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in te.modules():
        if isinstance(m, BaseTunerLayer):
            if fuse:
                m.merge()
            elif m.merged:
                m.unmerge()


def child(side: str, width: str, dtype_name: str, device: str, files: list, outdir: str, backup: str = "") -> dict:
    import torch

    sys.path.insert(0, str(C.ROOT))
    from lib_sdtoolkit.samples import factory

    torch.set_grad_enabled(False)
    dev = torch.device(device)
    dtype = _torch_dtype(dtype_name)
    cfg = factory.get_config("SD1", "full" if width == "mid" else width)
    te = _randomize(factory.build_text_encoder(cfg.text_encoders[0], device="meta"), dev, dtype, 2)
    unet = _randomize(build_unet(width, False), dev, dtype, 1)
    if side == "diffusers":
        from lib_sdtoolkit.arch.keymaps import convert_unet_ldm_to_diffusers

        dunet = build_unet(width, True)
        dunet.load_state_dict(convert_unet_ldm_to_diffusers(unet.state_dict(), "SD1", prefix=""), strict=True,
                              assign=True)
        del unet
        unet = dunet.to(dev)
    gc.collect()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g).to(dev, dtype)
    ts = torch.tensor([500.0], device=dev)
    ctx = (torch.randn(1, 77, cfg.text_encoders[0].config["hidden_size"], generator=g) * 0.5).to(dev, dtype)
    pos = torch.arange(77, device=dev)[None]
    ids = torch.randint(0, cfg.text_encoders[0].config["vocab_size"], (1, 77), generator=g).to(dev)

    def forward():
        try:
            u = unet(x, ts, encoder_hidden_states=ctx).sample if side == "diffusers" else unet(x, ts, context=ctx)
            # position ids given: the module was built on the meta device and every buffer randomised, the
            # non-persistent position_ids too (they index the position table: out of range otherwise)
            t = te(input_ids=ids, position_ids=pos).last_hidden_state
            return {"unet": u.float().cpu(), "te": t.float().cpu()}
        except Exception as e:  # e.g. an op without a half-precision CPU kernel
            return {"error": f"{type(e).__name__}: {e}"}

    base_out = forward()
    fp0 = _fingerprint(unet, te)
    gc.collect()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def mem_now():
        if dev.type == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return C.status_mb("VmRSS")

    def mem_peak():
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return C.status_mb("VmHWM")

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    C.reset_peak_rss()
    base = mem_now()
    res = {}

    def phase(name, fn):
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        res[name] = time.perf_counter() - t
        res[name + "_cpu"] = time.process_time() - c

    ckpt = None
    if side == "ours":
        from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding
        from lib_sdtoolkit.lora.network import load_network

        bind = ModelBinding.from_parts("SD1", unet=unet, text_encoder=te)
        if backup == "file":
            # the checkpoint the weights "were loaded from" (fp16, checkpoint keys), written before the window
            ckpt = os.path.join(outdir, f"model-{width}.safetensors")
            if not os.path.exists(ckpt):
                from lib_sdtoolkit.files import save_safetensors

                save_safetensors(ckpt, {k: getattr(m, a).detach().to("cpu", torch.float16).contiguous()
                                        for k, (m, a) in bind._params.items()})
            res_file = C.residency([ckpt])
        gc.collect()
        C.reset_peak_rss()
        base = mem_now()
        p = LoraPatcher(bind, backup=backup or "auto", source=ckpt, spill_dir=outdir)
        nets = {}

        def apply(i, mult=1.0):
            if i not in nets:
                nets[i] = load_network(files[i], "SD1")
            p.set_networks([ActiveNetwork(nets[i], te=mult, unet=mult)])

        phase("apply", lambda: apply(0))
        out1 = forward()
        phase("switch", lambda: apply(1))
        phase("same", lambda: apply(1))
        phase("reweight", lambda: apply(1, 0.8))
        res["peak_growth_mb"] = mem_peak() - base
        res["resident_growth_mb"] = mem_now() - base
        st = p.backup_stats
        res["backups_file"], res["backups_spill"], res["backups_ram"] = (st["count"][x] for x in ("file", "spill", "ram"))
        res["fallbacks"] = len(st["fallbacks"])
        if ckpt:
            res["ckpt_residency"] = res_file
        phase("restore", lambda: p.restore_all())
        p.close()
    else:
        from diffusers import StableDiffusionPipeline
        from peft.tuners.tuners_utils import BaseTunerLayer

        gc.collect()
        C.reset_peak_rss()
        base = mem_now()

        def d_load(i, name):
            state, alphas = StableDiffusionPipeline.lora_state_dict(str(files[i]))
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=name)
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, te, adapter_name=name)
            unet.fuse_lora(adapter_names=[name])
            _fuse_te(te, True)

        def d_unload(name):
            unet.unfuse_lora()
            _fuse_te(te, False)
            unet.delete_adapters(name)
            for m in te.modules():
                if isinstance(m, BaseTunerLayer):
                    m.delete_adapter(name)

        def d_refuse(name, weight=None):
            unet.unfuse_lora()
            _fuse_te(te, False)
            if weight is not None:
                unet.set_adapters([name], weights=[weight])
                for m in te.modules():
                    if isinstance(m, BaseTunerLayer):
                        m.set_scale(name, weight)
            unet.fuse_lora(adapter_names=[name])
            _fuse_te(te, True)

        current = {}

        def d_set(name, i, weight=1.0):
            """What a caller of diffusers does for a requested set: nothing when it is the fused one."""
            if current.get("set") == (name, weight):
                return
            if current.get("set") and current["set"][0] != name:
                d_unload(current["set"][0])
            if current.get("set") and current["set"][0] == name:
                d_refuse(name, weight)
            else:
                d_load(i, name)
            current["set"] = (name, weight)

        phase("apply", lambda: d_set("a0", 0))
        out1 = forward()
        phase("switch", lambda: d_set("a1", 1))
        phase("same", lambda: d_set("a1", 1))
        phase("reweight", lambda: d_set("a1", 1, 0.8))
        res["peak_growth_mb"] = mem_peak() - base
        res["resident_growth_mb"] = mem_now() - base
        phase("restore", lambda: d_unload("a1"))
    fp1 = _fingerprint(unet, te)
    changed = sum(1 for k in fp0 if fp0[k] != fp1.get(k))
    res["restore_exact"] = int(changed == 0)
    res["restore_changed_params"] = changed
    if "error" not in out1 and "error" not in base_out:
        torch.save({"base": base_out, "lora1": out1}, os.path.join(outdir, f"{side}{backup}-outputs.pt"))
    else:
        res["forward_error"] = out1.get("error") or base_out.get("error")
    return res


# ----------------------------------------------------------------------------------------------- driver
def make_loras(width: str, dtype: str, rank: int, tmp: Path) -> dict:
    """Write the two LoRA files (a child: the driver stays torch-free) and count the touched weights."""
    code = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/bench")
from lora_bench import build_unet
from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.lora.apply import ModelBinding
from lib_sdtoolkit.lora.synth import attention_and_conv, make_lora_state_dict
from lib_sdtoolkit.samples import factory
width, rank, tmp, es = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cfg = factory.get_config("SD1", "full" if width == "mid" else width)
bind = ModelBinding.from_parts("SD1", unet=build_unet(width, False),
                               text_encoder=factory.build_text_encoder(cfg.text_encoders[0], device="meta"))
files, touched, layers = [], 0, 0
for seed in (1, 2):
    sd = make_lora_state_dict(bind.target_shape, "SD1", rank=rank, seed=seed, scale=0.01,
                              name_filter=attention_and_conv, dtype=torch.float16)
    files.append(str(save_safetensors(tmp + f"/l{seed}.safetensors", sd)))
from lib_sdtoolkit.lora.network import load_network
net = load_network(files[0], "SD1")
for layer in net.layers:
    touched += int(torch.tensor(bind.target_shape(layer.weight_key)).prod()) * es
print(json.dumps({"files": files, "touched_mb": touched / 2**20, "layers": len(net.layers)}))
"""
    es = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    r = C.run_command([C.PY, "-c", code, str(C.ROOT), width, str(rank), str(tmp), str(es)], cwd=C.ROOT)
    return C.last_json(r["stdout"])


def compare_outputs(tmp: Path, kind: str) -> dict:
    code = r"""
import json, sys, torch
o = torch.load(sys.argv[1] + "/ours" + sys.argv[2] + "-outputs.pt", weights_only=True)
d = torch.load(sys.argv[1] + "/diffusers-outputs.pt", weights_only=True)
r = {}
for k in ("unet", "te"):
    r[k + "_ours_vs_diffusers"] = float((o["lora1"][k] - d["lora1"][k]).abs().max())
    r[k + "_lora_effect"] = float((o["lora1"][k] - o["base"][k]).abs().max())
    r[k + "_base_ours_vs_diffusers"] = float((o["base"][k] - d["base"][k]).abs().max())
print(json.dumps(r))
"""
    return C.last_json(C.run_command([C.PY, "-c", code, str(tmp), kind])["stdout"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp16", choices=DTYPES)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--width", default=None, choices=["full", "mid", "tiny"])
    ap.add_argument("--repeat", type=int, default=None, help="same as --rounds")
    ap.add_argument("--backups", default="file,spill,ram",
                    help="our sides, one per backup kind (lib_sdtoolkit.lora.backups): file, spill, ram")
    C.size_arg(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(child(**spec)))
        return 0
    width = a.width or a.size
    rounds = a.repeat or a.rounds
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="lora_bench_", dir=os.environ.get("SDTOOLKIT_BENCH_DIR")))
    rows = []
    try:
        info = make_loras(width, a.dtype, a.rank, tmp)
        log(f"machine: {C.machine_facts(tmp)}")
        log(f"model: SD1.5 UNet + CLIP-L, {width} width, {a.dtype} on {a.device}; LoRA rank {a.rank}, "
            f"{info['layers']} layers, touched weights {info['touched_mb']:.0f} MiB; {rounds} alternated rounds")
        mem_need = {"full": 9000, "mid": 4000, "tiny": 500}[width] * (2 if a.dtype == "fp32" else 1)
        if C.mem_available_mb() < mem_need + 2000:
            log(f"SKIPPED: memory short ({C.mem_available_mb():.0f} MB available, about {mem_need} MB needed + 2 GB)")
            rows.append(C.Row("lora", "SKIPPED", "", "", "n/a", "memory short", "", ""))
            C.emit_rows(rows, a.rows)
            return 0

        def side(name, backup=""):
            spec = {"side": name, "width": width, "dtype_name": a.dtype, "device": a.device, "files": info["files"],
                    "outdir": str(tmp), "backup": backup}
            argv = [C.PY, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            label = f"ours ({backup})" if backup else name

            def run():
                r = C.run_command(argv, cwd=C.ROOT)
                return C.last_json(r["stdout"])
            return C.Side(label, run, command=f"python bench/lora_bench.py --width {width} --dtype {a.dtype} "
                                               f"--rank {a.rank} --rounds {rounds} (child: {label})")

        kinds = [k.strip() for k in a.backups.split(",") if k.strip()]
        sides = [side("ours", k) for k in kinds] + [side("diffusers")]
        names = [s.name for s in sides]
        r = C.alternate(sides, rounds, log)
        labels = [("apply", "apply: read + patch LoRA 1"), ("switch", "switch to LoRA 2"),
                  ("same", "same set again (both: the set is unchanged, nothing to do)"),
                  ("reweight", "same LoRA, weight 0.8 (equal work)"), ("restore", "restore")]
        for k, label in labels:
            C.print_summary(r, k, unit="ms", scale=1000, digits=1, title=label + ", wall", ref="diffusers", log=log)
            C.print_summary(r, k + "_cpu", unit="s", digits=2, title=label + ", process CPU", ref="diffusers",
                            log=log)
        C.print_summary(r, "peak_growth_mb", unit="MB", digits=0, ref="diffusers", log=log,
                        title=f"peak RSS growth over the base, phases 1-4 (touched weights {info['touched_mb']:.0f} MiB)")
        C.print_summary(r, "resident_growth_mb", unit="MB", digits=0, ref="diffusers", log=log,
                        title="resident growth after phase 4")
        for n in names[:-1]:
            x = r.results[n][-1]
            log(f"  {n}: backups file {x.get('backups_file')}, spill {x.get('backups_spill')}, ram "
                f"{x.get('backups_ram')}, fallbacks {x.get('fallbacks')}"
                + (f"; checkpoint residency before phase 1 {C.fmt_res(x['ckpt_residency'])}" if "ckpt_residency" in x
                   else ""))
        exact = {s: all(x.get("restore_exact") for x in r.results[s]) for s in names}
        changed = {s: max(x.get("restore_changed_params", 0) for x in r.results[s]) for s in names}
        log("  restore bit-exact: " + ", ".join(f"{s} {'yes' if exact[s] else 'NO'} ({changed[s]} params differ)"
                                                for s in names))
        try:
            cmpr = compare_outputs(tmp, kinds[0])
            check = (f"outputs after LoRA 1, ours vs diffusers: UNet max|d| {cmpr['unet_ours_vs_diffusers']:.2g} "
                     f"(LoRA effect {cmpr['unet_lora_effect']:.2g}, unpatched {cmpr['unet_base_ours_vs_diffusers']:.2g}),"
                     f" CLIP max|d| {cmpr['te_ours_vs_diffusers']:.2g} (LoRA effect {cmpr['te_lora_effect']:.2g})")
        except Exception as e:  # noqa: BLE001
            errs = {x.get("forward_error") for s in r.results.values() for x in s if x.get("forward_error")}
            check = f"outputs not compared: {'; '.join(errs) or e}"
        check += "; restore exact: " + ", ".join(f"{s} {'yes' if exact[s] else 'NO'}" for s in names)
        log(f"  check: {check}")
        cmd = r.sides[0].command.split(" (child")[0]
        bench = f"lora {width} {a.dtype}"
        mb = info["touched_mb"]
        for n in names[:-1]:
            cache = {"ours (file)": "originals read back from the fp16 checkpoint (page cache warm)",
                     "ours (spill)": "originals spilled to a temp file", "ours (ram)": "originals kept in RAM"}.get(n, "")
            for k, label in labels:
                rows.append(C.row_for(r, bench, label + ", wall", n, "diffusers", k, check, cache, cmd,
                                      unit="ms", scale=1000, digits=1))
            pk = C.med_min_max(r.values(n, "peak_growth_mb"))[0]
            rows.append(C.row_for(r, bench, f"peak RSS growth, phases 1-4 (touched weights {mb:.0f} MiB)", n,
                                  "diffusers", "peak_growth_mb", check, cache, cmd, unit="MB", digits=0,
                                  target=f"{n} = {pk / mb:.2f}x the touched weights (issue 17: factors + one layer)"))
            rows.append(C.row_for(r, bench, "resident growth after phase 4", n, "diffusers", "resident_growth_mb",
                                  check, cache, cmd, unit="MB", digits=0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    C.emit_rows(rows, a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
