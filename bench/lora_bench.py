"""LoRA apply/switch/re-apply cost and memory: lib_sdtoolkit.lora vs diffusers load_lora_weights + fuse/unfuse.

Full-width SD1.5 UNet + CLIP-L text encoder with random weights (nothing downloaded), two rank-64 kohya LoRAs over all
attention, feed-forward and ResNet/sampler conv layers. Ours patches the real ldm UNetModel + transformers CLIP;
diffusers patches the equivalent UNet2DConditionModel + the same CLIP through PEFT (``load_lora_into_unet`` /
``load_lora_into_text_encoder`` = what ``pipe.load_lora_weights`` calls, then ``fuse_lora`` / ``unfuse_lora``).

    python bench/lora_bench.py [--device cuda] [--dtype fp16] [--rank 64] [--width full|mid|tiny] [--repeat 3]

``--width mid`` = the full SD1.5 layout at half the UNet channels (160 instead of 320; same CLIP-L), for profiling.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_sdtoolkit.files import save_safetensors  # noqa: E402
from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding  # noqa: E402
from lib_sdtoolkit.lora.network import load_network  # noqa: E402
from lib_sdtoolkit.lora.synth import attention_and_conv, make_lora_state_dict  # noqa: E402
from lib_sdtoolkit.samples import factory  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Tm:
    """Wall seconds and this process's CPU seconds (less sensitive to other processes taking the cores)."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = wall, cpu

    def __add__(self, other: "Tm") -> "Tm":
        return Tm(self.wall + other.wall, self.cpu + other.cpu)


def timed(dev, fn):
    sync(dev)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(dev)
    return Tm(time.perf_counter() - t, time.process_time() - c), out


def best(runs):
    """Per measure, the fastest run (wall time; memory: the largest growth)."""
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = max(vals) if k == "mem" else min(vals, key=lambda t: t.wall)
    return out


def reset_peak(dev) -> None:
    """Start a new peak: CUDA peak stats, or the kernel's VmHWM (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)
    so each phase's peak is its own rather than the process's so far."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def current(dev) -> int:
    if dev.type == "cuda":
        return torch.cuda.memory_allocated()
    try:
        return _status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def randomize(m, dev, dtype):
    m = m.to_empty(device=dev)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(dtype)


def build_unet(width: str, diffusers: bool):
    """UNet on the meta device; ``mid`` = full layout with half the channels."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--width", default="full", choices=["full", "mid", "tiny"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest is printed (shared machines)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = factory.get_config("SD1", "full" if a.width == "mid" else a.width)
    tmp = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    touched_bytes = 0
    try:
        unet = randomize(build_unet(a.width, False), dev, dtype)
        te = randomize(factory.build_text_encoder(cfg.text_encoders[0], device="meta"), dev, dtype)
        bind = ModelBinding.from_parts("SD1", unet=unet, text_encoder=te)
        files = []
        for seed in (1, 2):
            sd = make_lora_state_dict(bind.target_shape, "SD1", rank=a.rank, seed=seed, scale=0.01,
                                      name_filter=attention_and_conv, dtype=torch.float16)
            files.append(save_safetensors(tmp / f"l{seed}.safetensors", sd))
        # ours: time = reading the file (load_network) + patching, memory = what patching adds (the parsed
        # network's own tensors are the LoRA, not overhead); diffusers: lora_state_dict + load_lora_into_* + fuse
        nets = [load_network(f, "SD1") for f in files]
        for layer in nets[0].layers:
            s = bind.target_shape(layer.weight_key)
            touched_bytes += int(torch.tensor(s).prod()) * torch.empty((), dtype=dtype).element_size()
        print(f"model: ldm UNet + CLIP-L, {a.width} width, {a.dtype} on {dev}; LoRA rank {a.rank}, "
              f"{len(nets[0].layers)} layers, touched weights {touched_bytes / 2**20:.0f} MiB; "
              f"torch threads {torch.get_num_threads()}; best of {a.repeat}")
        del nets
        gc.collect()
        runs = []
        for rep in range(a.repeat):
            p = LoraPatcher(bind)
            t_load, nets = [], []
            for f in files:
                t, n = timed(dev, lambda f=f: load_network(f, "SD1"))
                t_load.append(t)
                nets.append(n)
            gc.collect()
            reset_peak(dev)
            m0 = current(dev)
            t_apply, _ = timed(dev, lambda: p.set_networks([ActiveNetwork(nets[0])]))
            t_switch, _ = timed(dev, lambda: p.set_networks([ActiveNetwork(nets[1])]))
            t_same, _ = timed(dev, lambda: p.set_networks([ActiveNetwork(nets[1])]))
            m1 = mem(dev)
            t_restore, _ = timed(dev, lambda: p.restore_all())
            runs.append(dict(apply=t_apply + t_load[0], switch=t_switch + t_load[1], same=t_same, restore=t_restore,
                             mem=m1 - m0))
            del p, nets
        ours = best(runs)
        del unet, bind
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        from diffusers import StableDiffusionPipeline

        dunet = randomize(build_unet(a.width, True), dev, dtype)

        # adapter names are unique per run: transformers remembers every name a text encoder has seen
        def d_load(i, name):
            state, alphas = StableDiffusionPipeline.lora_state_dict(str(files[i]))
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, dunet, adapter_name=name)
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, te, adapter_name=name)
            dunet.fuse_lora(adapter_names=[name])
            _fuse_te(te, True)

        def d_unload(name):
            dunet.unfuse_lora()
            _fuse_te(te, False)
            dunet.delete_adapters(name)
            from peft.tuners.tuners_utils import BaseTunerLayer
            for m in te.modules():
                if isinstance(m, BaseTunerLayer):
                    m.delete_adapter(name)

        def d_refuse(name):
            dunet.unfuse_lora()
            _fuse_te(te, False)
            dunet.fuse_lora(adapter_names=[name])
            _fuse_te(te, True)

        runs = []
        for rep in range(a.repeat):
            gc.collect()
            reset_peak(dev)
            m0 = current(dev)
            n0, n1 = f"a0r{rep}", f"a1r{rep}"
            d_apply, _ = timed(dev, lambda: d_load(0, n0))
            d_switch, _ = timed(dev, lambda: (d_unload(n0), d_load(1, n1)))
            d_same, _ = timed(dev, lambda: d_refuse(n1))
            m1 = mem(dev)
            d_unload(n1)
            runs.append(dict(apply=d_apply, switch=d_switch, same=d_same, mem=m1 - m0))
        diff = best(runs)
        print(f"{'wall (cpu) time':24}{'sd-toolkit':>22}{'diffusers':>22}{'ratio':>14}")
        for k, label in (("apply", "apply rank-64 LoRA"), ("switch", "switch to another"),
                         ("same", "re-apply same set")):
            o, d = ours[k], diff[k]
            print(f"{label:24}{o.wall * 1000:10.1f}ms ({o.cpu:6.1f}s){d.wall * 1000:10.1f}ms ({d.cpu:6.1f}s)"
                  f"{o.wall / max(d.wall, 1e-9):7.3f} ({o.cpu / max(d.cpu, 1e-9):.3f})")
        print(f"{'restore (ours)':24}{ours['restore'].wall * 1000:10.1f}ms ({ours['restore'].cpu:6.1f}s)")
        unit = "peak GPU growth" if dev.type == "cuda" else "peak RSS growth"
        print(f"{unit:24}{ours['mem'] / 2**20:10.0f}MB{diff['mem'] / 2**20:10.0f}MB"
              f"{ours['mem'] / max(diff['mem'], 1):8.3f}   (touched weights once: {touched_bytes / 2**20:.0f} MB)")
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    return 0


def _fuse_te(te, fuse: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in te.modules():
        if isinstance(m, BaseTunerLayer):
            if fuse:
                m.merge()
            elif m.merged:
                m.unmerge()


if __name__ == "__main__":
    sys.exit(main())
