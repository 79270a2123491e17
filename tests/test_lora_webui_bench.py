"""bench/lora_webui_bench.py builds its model from bench/lora_bench.py's helpers: a rename there broke the bench
(ImportError before anything was measured); the model it builds is checked at the factory's tiny width."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)


def test_bench_builds_sd1_in_the_webui_layout_with_random_weights():
    from bench import lora_webui_bench as b

    m = b.build_model("tiny")
    keys = dict(m.named_parameters())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert any(k.startswith("cond_stage_model.") and "encoder.layers.0.self_attn.q_proj" in k for k in keys)
    w = m.model.diffusion_model.input_blocks[1][1].proj_in.weight
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and w.std() > 0    # initialised, not to_empty junk
    emb = [mod for mod in m.modules() if hasattr(mod, "position_ids")][0]
    assert torch.equal(emb.position_ids[0], torch.arange(emb.position_ids.shape[-1]))


def test_bench_removes_its_temporary_folders(tmp_path, monkeypatch):
    """The bench left a /tmp/lora_webui_bench_* folder (two LoRA files, a WebUI data folder) behind on every run;
    now each run removes its own, also when it fails, and sweeps those of runs that died (dead process id) but not
    those of a run still going."""
    import os
    import subprocess
    import tempfile

    from bench import lora_webui_bench as b

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{b.TMP_PREFIX}{dead.pid}_x"
    live = tmp_path / f"{b.TMP_PREFIX}{os.getpid()}_y"
    other = tmp_path / "someone_elses"
    for d in (stale, live, other):
        (d / "data").mkdir(parents=True)
    seen = []

    def boom(tmp, *args):
        seen.append(tmp)
        (tmp / "data" / "models").mkdir(parents=True)
        raise RuntimeError("the run failed")

    monkeypatch.setattr(b, "_run", boom)
    try:
        b.run("tiny", True, 4, 8)
    except RuntimeError:
        pass
    assert seen and not seen[0].exists() and seen[0].parent == tmp_path
    assert not stale.exists() and live.exists() and other.exists()
