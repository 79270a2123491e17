"""scripts/sdtoolkit_tiled_vae.py in the WebUI double: the accordion wraps the loaded VAE's encoder/decoder for
one generation, the decode equals the unpatched one, and the VAE is restored after success, after an exception
(through ``closing(p)``) and, failing that, at the next generation's ``before_process``."""
from __future__ import annotations

import importlib.util
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"


@pytest.fixture(scope="module")
def webui():
    if str(DOUBLE) not in sys.path:
        sys.path.append(str(DOUBLE))
    from webui_harness import use_double
    use_double()
    spec = importlib.util.spec_from_file_location("sdtoolkit_tiled_vae", ROOT / "scripts" / "sdtoolkit_tiled_vae.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT))
    from modules import processing, shared
    from lib_sdtoolkit.samples import factory

    class LatentDiffusion(torch.nn.Module):  # ldm's decode_first_stage: 1/scale_factor, first_stage_model.decode
        def __init__(self):
            super().__init__()
            self.first_stage_model = factory.build_ldm_vae("tiny")
            self.scale_factor = 0.18215

        def decode_first_stage(self, z):
            return self.first_stage_model.decode(z / self.scale_factor)

    model = LatentDiffusion()
    old = shared.sd_model
    shared.sd_model = model
    yield mod, processing, shared, model
    shared.sd_model = old


class _Runner:
    """Stand-in for ScriptRunner's dispatch: each hook gets p.script_args[args_from:args_to]."""

    def __init__(self, script):
        self.script = script
        script.args_from, script.args_to = 0, 5

    def _args(self, p):
        return p.script_args[self.script.args_from:self.script.args_to]

    def before_process(self, p):
        self.script.before_process(p, *self._args(p))

    def process(self, p):
        self.script.process(p, *self._args(p))

    def postprocess(self, p, res):
        self.script.postprocess(p, res, *self._args(p))


def _latent():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 10, 9, generator=g) * 0.18215 * 4


def _p(processing, shared, script, sample_fn, enabled=True):
    p = processing.StableDiffusionProcessingTxt2Img(shared.sd_model, _Runner(script), [enabled, 0, 32, False, "CPU"])
    p.sample = sample_fn
    return p


def test_generation_uses_tiled_decode_and_restores(webui):
    mod, processing, shared, model = webui
    dec = model.first_stage_model.decoder
    z = _latent()
    with torch.no_grad():
        ref = model.decode_first_stage(z)
    seen = []

    def sample(*a):
        seen.append(getattr(dec.forward, "__sdtoolkit_tiled__", False))
        return z

    script = mod.Script()
    p = _p(processing, shared, script, sample)
    with closing(p):
        res = processing.process_images(p)
    assert seen == [True]
    assert "forward" not in dec.__dict__ and "forward" not in model.first_stage_model.encoder.__dict__
    assert torch.allclose(res.images[0], ref[0], atol=2e-5)
    assert "Tiled VAE" in p.extra_generation_params and "dec 32" in p.extra_generation_params["Tiled VAE"]


def test_vae_restored_after_exception_in_generation(webui):
    mod, processing, shared, model = webui
    dec = model.first_stage_model.decoder

    def sample(*a):
        assert getattr(dec.forward, "__sdtoolkit_tiled__", False)
        raise RuntimeError("sampler failed")

    p = _p(processing, shared, mod.Script(), sample)
    with pytest.raises(RuntimeError, match="sampler failed"):
        with closing(p):
            processing.process_images(p)
    assert "forward" not in dec.__dict__


def test_leftover_patch_removed_by_next_generation(webui):
    mod, processing, shared, model = webui
    dec = model.first_stage_model.decoder
    script = mod.Script()

    def boom(*a):
        raise RuntimeError("x")

    p = _p(processing, shared, script, boom)
    with pytest.raises(RuntimeError):
        processing.process_images(p)  # a caller that never closes p
    assert "forward" in dec.__dict__  # still patched ...
    states = []

    def sample(*a):
        states.append("forward" in dec.__dict__)
        return _latent()

    p2 = _p(processing, shared, script, sample, enabled=False)
    processing.process_images(p2)
    assert states == [False] and "forward" not in dec.__dict__  # ... until the next generation starts


def test_ui_builds_accordion(webui):
    import gradio as gr
    mod, *_ = webui
    s = mod.Script()
    s.is_txt2img = True
    with gr.Blocks():
        comps = s.ui(False)
    assert len(comps) == 5 and comps[0].value is False
    from modules import scripts
    assert s.show(False) is scripts.AlwaysVisible


def test_interrupt_mid_decode_stops_and_restores(webui):
    from lib_sdtoolkit.tiled_vae import TiledVAEInterrupted

    mod, processing, shared, model = webui
    dec = model.first_stage_model.decoder
    convs = []

    def press_interrupt(m, args, out):  # the user presses Interrupt while the decoder runs (another thread)
        convs.append(m)
        if len(convs) == 3:
            shared.state.interrupted = True

    hook = dec.conv_in.register_forward_hook(press_interrupt)
    texts = []
    try:
        p = _p(processing, shared, mod.Script(), lambda *a: _latent())
        with pytest.raises(TiledVAEInterrupted, match="interrupted after"):
            with closing(p):
                processing.process_images(p)
        texts.append(shared.state.textinfo)
    finally:
        hook.remove()
        shared.state.interrupted = False
    assert len(convs) == 3                                     # stopped at the next tile: no further tile ran
    assert "forward" not in dec.__dict__ and "forward" not in model.first_stage_model.encoder.__dict__
    assert texts[0].startswith("Tiled VAE: tile 3/")


@pytest.mark.parametrize("flag", ["interrupted", "skipped"])
def test_stop_pending_before_decode_still_decodes_the_last_latent(webui, flag):
    # Interrupt/Skip pressed during sampling: the WebUI's sampler returns the last latent and decodes it on
    # purpose; that decode must finish (only a press during the decode stops it)
    mod, processing, shared, model = webui
    z = _latent()
    with torch.no_grad():
        ref = model.decode_first_stage(z)

    def sample(*a):
        setattr(shared.state, flag, True)
        return z

    p = _p(processing, shared, mod.Script(), sample)
    try:
        with closing(p):
            res = processing.process_images(p)
    finally:
        setattr(shared.state, flag, False)
    assert torch.allclose(res.images[0], ref[0], atol=2e-5)
    assert "forward" not in model.first_stage_model.decoder.__dict__
