"""LoRA in the WebUI, memory: ``<sdtlora>`` beside the built-in Lora extension, and our ``<lora>`` with it disabled.

Runs the WebUI double (tests/webui_double: A1111 1.10's start-up order, its extra-network plumbing and a built-in
Lora that merges networks into the weights lazily at each module's forward from its own CPU backup) on an SD1.5
``sd_model`` in the WebUI's layout (ldm UNet at ``model.diffusion_model``, CLIP-L wrapped by the hijack) with random
weights at full width (nothing downloaded), and two rank-64 LoRAs over attention, feed-forward and ResNet convs.
Each "generation" parses the prompt, activates the extra networks, encodes the prompt and runs one UNet step
(so the built-in really merges), then prints per step the process's peak RSS (VmHWM, reset per step) and its RSS
afterwards, both as growth over the RSS after the model was loaded, and what each party keeps:

* ``builtin backup``: bytes of the built-in's ``network_weights_backup``/``network_bias_backup`` CPU copies;
* ``ours kept``: what our network keeps alive between generations (hooks: the LoRA factors; in place: the patched
  copies, ``backup_bytes``);
* the target: beside the built-in, ``<sdtlora>`` may add at most the LoRA factors plus one layer's ΔW.

    python bench/lora_webui_bench.py [--width full|mid] [--builtin on|off|both] [--rank 64] [--latent 16]

Prints the ratios: (peak growth - built-in backup) / (factors + largest layer ΔW) beside the built-in, and RSS growth
/ touched weights with the built-in disabled.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
for p in (str(ROOT), str(DOUBLE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from torch import nn  # noqa: E402


def status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def mib(n: float) -> str:
    return f"{n / 2**20:8.0f} MiB"


# ------------------------------------------------------------------ the WebUI's sd_model layout (ldm + sd_hijack)
class EmbeddingsWithFixes(nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        vocab = self.wrapped.transformer.config.vocab_size
        rows = []
        for t in texts:
            ids = [vocab - 2] + [ord(c) % (vocab - 2) for c in t][:75]
            rows.append(ids + [vocab - 1] * (77 - len(ids)))
        return self.wrapped.transformer(input_ids=torch.tensor(rows)).last_hidden_state


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class LatentDiffusion(nn.Module):
    is_sdxl = False
    is_sd2 = False
    is_sd1 = True

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        emb = text_encoder.text_model.embeddings
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding)
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder(text_encoder))

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)

    def decode_first_stage(self, z):
        return z                                            # the VAE is not what is measured


def build_model(width: str):
    """SD1.5 in the WebUI layout with random fp32 weights: ``full``, ``mid`` (the UNet at half the channels) or
    ``tiny`` (the factory's test width; tests/test_lora_webui_bench.py)."""
    from bench.lora_bench import _randomize, build_unet
    from lib_sdtoolkit.samples import factory

    cfg = factory.get_config("SD1", "tiny" if width == "tiny" else "full")
    unet = _randomize(build_unet(width, False), torch.device("cpu"), torch.float32, seed=0)
    te = _randomize(factory.build_text_encoder(cfg.text_encoders[0], device="meta"), torch.device("cpu"),
                    torch.float32, seed=1)
    emb = te.text_model.embeddings                         # to_empty left the buffer uninitialised
    emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand_as(emb.position_ids))
    return LatentDiffusion(unet, te).eval()


TMP_PREFIX = "lora_webui_bench_"


def _sweep_stale_tmp() -> None:
    """Remove the temporary folders of earlier runs that died before their own clean-up (killed, out of memory):
    only ours (the prefix and a process id that no longer runs)."""
    base = Path(tempfile.gettempdir())
    for d in base.glob(TMP_PREFIX + "*"):
        pid = d.name[len(TMP_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or not d.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (another run of this bench)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def run(width: str, builtin: bool, rank: int, latent: int, baseline: bool = False) -> float:
    """One configuration in a temporary WebUI data folder, removed afterwards (it holds two LoRA files)."""
    _sweep_stale_tmp()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}_"))
    try:
        return _run(tmp, width, builtin, rank, latent, baseline)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path, width: str, builtin: bool, rank: int, latent: int, baseline: bool = False) -> float:
    from webui_harness import WebUIDouble
    from modules import extra_networks, processing, script_callbacks, scripts, shared, ui_extra_networks

    from lib_sdtoolkit.files import save_safetensors
    from lib_sdtoolkit.lora.apply import ModelBinding
    from lib_sdtoolkit.lora.network import load_network
    from lib_sdtoolkit.lora.synth import attention_and_conv, make_lora_state_dict

    model = build_model(width)
    bind = ModelBinding.from_checkpoint_module(model, "SD1")
    w = WebUIDouble(str(ROOT), str(tmp / "data"))
    w.preload([])
    lora_dir = tmp / "data" / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("a", "b")):
        sd = make_lora_state_dict(bind.target_shape, "SD1", rank=rank, seed=i + 1, scale=0.01,
                                  name_filter=attention_and_conv, dtype=torch.float16)
        save_safetensors(lora_dir / f"{name}.safetensors", sd)
    net = load_network(lora_dir / "a.safetensors", "SD1")
    touched = largest = factors = 0
    for layer in net.layers:
        n = int(torch.tensor(bind.target_shape(layer.weight_key)).prod())
        touched += n * 4
        largest = max(largest, n * 4)
        factors += sum(t.numel() for t in layer.weights.t.values()) * 4     # held in fp32 by the hooks
    del net
    shared.sd_model = model
    scripts.extension_dirs[:] = ([str(DOUBLE / "extensions-builtin" / "Lora")] if builtin else []) + [str(ROOT)]
    loaded = {m.__name__: m for m in scripts.load_scripts()}
    ui_extra_networks.initialize()
    extra_networks.initialize()
    script_callbacks.before_ui_callback()
    ours = loaded["sdtoolkit_lora.py"]
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    torch.set_grad_enabled(False)

    def generate(prompt):
        def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
            model.model.diffusion_model(x, torch.tensor([10]), context=conditioning)
            return torch.zeros(1, 4, 4, 4)

        p = processing.StableDiffusionProcessingTxt2Img(model, None, (), prompt=prompt, steps=1)
        p.sample = sample
        processing.process_images(p)

    def builtin_backup():
        n = 0
        for m in model.modules():
            for attr in ("network_weights_backup", "network_bias_backup"):
                b = getattr(m, attr, None)
                for t in (b if isinstance(b, tuple) else (b,)):
                    if isinstance(t, torch.Tensor):
                        n += t.numel() * t.element_size()
        return n

    def ours_kept():
        pt = ours.network.patcher if ours.network is not None else None
        if pt is None:
            return 0
        return getattr(pt, "kept_bytes", None) or getattr(pt, "backup_bytes", 0)

    generate("a photo")                                    # warm-up: first forwards, allocator pools
    gc.collect()
    rss0 = status_kb("VmRSS") * 1024
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    print(f"SD1.5 {width} width fp32 in the WebUI layout: {mib(params)} of weights; LoRA rank {rank}, "
          f"{len(bind.shapes_for(load_network(lora_dir / 'a.safetensors', 'SD1')))} layers, touched weights "
          f"{mib(touched)}, factors (fp32) {mib(factors)}, largest layer ΔW {mib(largest)}; built-in Lora "
          f"{'ENABLED' if builtin else 'disabled'}; RSS after load {mib(rss0)}")
    tag = "lora" if not builtin else "sdtlora"
    steps = [f"a photo <{tag}:a:1>", "a photo <lora:b:1>", f"a photo <{tag}:a:1>",
             f"a photo <lora:b:1> <{tag}:a:0.5>", f"a photo <{tag}:b:1>", "a photo"]
    if baseline:        # the same sequence without our tags: what the built-in alone costs
        steps = [" ".join(w for w in s.split() if not w.startswith(f"<{tag}:")) for s in steps]
    worst_extra = worst = 0
    for prompt in steps:
        gc.collect()
        reset_peak()
        generate(prompt)
        peak = status_kb("VmHWM") * 1024 - rss0
        now = status_kb("VmRSS") * 1024 - rss0
        bb, ok = builtin_backup(), ours_kept()
        worst_extra = max(worst_extra, peak - bb)
        worst = max(worst, peak)
        print(f"  {prompt:42s} peak +{mib(peak)}  after +{mib(now)}  builtin backup {mib(bb)}  ours kept {mib(ok)}"
              f"  mode {ours.network.mode if ours.network is not None else '-'}", flush=True)
    if baseline:
        print(f"built-in alone (no <sdtlora>): peak growth {mib(worst)}", flush=True)
    elif builtin:
        print(f"beside the built-in: peak growth {mib(worst)}; worst (peak - built-in backup) {mib(worst_extra)}; "
              f"target for <sdtlora>: factors + largest ΔW = {mib(factors + largest)}", flush=True)
    else:
        print(f"built-in disabled: peak growth {mib(worst)} = {worst / touched:.2f}x the touched weights "
              f"({mib(touched)})", flush=True)
    script_callbacks.script_unloaded_callback()
    import json

    print(json.dumps({"worst": worst, "worst_extra": worst_extra, "touched": touched, "factors": factors,
                      "largest": largest}), flush=True)
    return worst


def rounds_main(a) -> int:
    """``--rounds N`` (run_all): the three configurations as whole processes, alternated over N rounds."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _common as C

    width = a.width or ("mid" if a.size == "tiny" else "full")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"machine: {C.machine_facts(ROOT)}")

    def side(b):
        argv = [sys.executable, __file__, "--width", width, "--rank", str(a.rank), "--latent", str(a.latent),
                "--builtin", b]

        def run():
            j = C.last_json(C.run_command(argv, cwd=ROOT)["stdout"])
            return {"peak_growth_mb": j["worst"] / 2**20, "extra_mb": j["worst_extra"] / 2**20,
                    "touched_mb": j["touched"] / 2**20, "target_mb": (j["factors"] + j["largest"]) / 2**20}
        return C.Side({"on": "<sdtlora> beside built-in", "baseline": "built-in alone",
                       "off": "ours, built-in disabled"}[b], run, command=C.cmd_str(argv).replace(sys.executable,
                                                                                             "python"))
    sides = [side("on"), side("baseline"), side("off")]
    r = C.alternate(sides, a.rounds, log)
    C.print_summary(r, "peak_growth_mb", unit="MB", digits=0, ref="built-in alone", log=log,
                    title="peak RSS growth over the loaded model, worst generation")
    on, base, off = (s.name for s in sides)
    added = [x - y for x, y in zip(r.values(on, "peak_growth_mb"), r.values(base, "peak_growth_mb"))]
    tgt = r.values(on, "target_mb")
    per_touched = [x / t for x, t in zip(r.values(off, "peak_growth_mb"), r.values(off, "touched_mb"))]
    log(f"  <sdtlora> adds over the built-in alone: {C.fmt_mmm(added, 'MB', digits=0)} per round "
        f"{', '.join(f'{x:.0f}' for x in added)}; target (factors + largest layer dW) {tgt[0]:.0f} MB")
    log(f"  built-in disabled (ours in place): peak growth / touched weights {C.fmt_ratio(per_touched)}")
    rows = [C.Row(f"lora webui {width}", "<sdtlora> beside the built-in: peak RSS added over the built-in alone",
                  f"{C.fmt_mmm(added, 'MB', digits=0)}", f"factors + largest dW: {tgt[0]:.0f} MB",
                  C.fmt_ratio([x / t for x, t in zip(added, tgt)]), "same prompts, same model", "in RAM",
                  sides[0].command, target="<= 1.0x (factors + one layer)",
                  loads=", ".join(f"{x:.1f}" for x in r.loads)),
            C.Row(f"lora webui {width}", "built-in disabled: our <lora> in place, peak RSS growth / touched weights",
                  f"{C.fmt_mmm(r.values(off, 'peak_growth_mb'), 'MB', digits=0)}",
                  f"touched weights {r.values(off, 'touched_mb')[0]:.0f} MB", C.fmt_ratio(per_touched),
                  "restore exact (tests/test_lora_backups.py)", "spill backups (no checkpoint file in the double)",
                  sides[2].command, target="factors + one layer (issue 17.1)",
                  loads=", ".join(f"{x:.1f}" for x in r.loads))]
    C.emit_rows(rows, a.rows)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", default=None, choices=["full", "mid"])
    ap.add_argument("--size", default=None, choices=["tiny", "mid", "full"], help="run_all: tiny = mid width")
    ap.add_argument("--rounds", type=int, default=0, help="alternate on / baseline / off as processes N rounds")
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--builtin", default="both", choices=["on", "off", "baseline", "both"],
                    help="on: <lora>+<sdtlora> beside the built-in; baseline: the same without <sdtlora>; off: the "
                         "built-in disabled; both: on + baseline (in parallel, one process each) + off")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--latent", type=int, default=16, help="latent side of the one UNet step per generation")
    a = ap.parse_args()
    if a.rounds or a.size:
        a.rounds = a.rounds or 3
        return rounds_main(a)
    a.width = a.width or "full"
    if a.builtin == "both":      # one process each: peak RSS is per process
        out = {}
        cmd = [sys.executable, __file__, "--width", a.width, "--rank", str(a.rank), "--latent", str(a.latent)]
        procs = {b: subprocess.Popen(cmd + ["--builtin", b], stdout=subprocess.PIPE, text=True)
                 for b in ("on", "baseline")}
        for b, pr in procs.items():
            text, _ = pr.communicate()
            print(text, end="")
            last = [ln for ln in text.splitlines() if ln.startswith("peak growth bytes ")]
            if pr.returncode != 0 or not last:
                print(f"the {b} run failed (exit {pr.returncode})", flush=True)
                return 1
            out[b] = float(last[-1].split()[-1])
        print(f"<sdtlora> beside the built-in adds {mib(out['on'] - out['baseline'])} of peak RSS over the built-in "
              f"alone", flush=True)
        subprocess.run(cmd + ["--builtin", "off"], check=True)
        return 0
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    worst = run(a.width, a.builtin in ("on", "baseline"), a.rank, a.latent, baseline=a.builtin == "baseline")
    print(f"peak growth bytes {worst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
