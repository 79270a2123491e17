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
