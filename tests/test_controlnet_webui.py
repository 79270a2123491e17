"""scripts/sdtoolkit_controlnet.py in the WebUI double, driven like a ``/sdapi/v1/txt2img`` call with
``"alwayson_scripts": {"controlnet": {"args": [unit dicts]}}``.

The flow is the WebUI's: scripts loaded by ``load_scripts``, a txt2img ``ScriptRunner`` whose ``setup_ui`` gives the
script its ``args_from..args_to`` slots, the API's ``init_script_args`` placing the request's unit dicts there,
``process_images`` (before_process -> process -> sampling -> decode -> postprocess) inside ``closing(p)``, and a
k-diffusion style Euler sampler whose ``CFGDenoiser`` fires ``on_cfg_denoiser`` and calls ``sd_model.apply_model``
-> ``model.diffusion_model`` (the real tiny ldm UNet).

Independent check: every UNet call made during sampling is recomputed with diffusers -- ``ControlNetModel`` (the
ControlNet file's weights through our ldm->diffusers map, ``strict=True``) gives the residuals, scaled by the
unit's weight from the published formula, and ``UNet2DConditionModel`` (same UNet weights) consumes them -- with the
canny map from the preprocessor function (tested on its own against OpenCV's rules) as the hint. The guidance
window is checked against the step the callback reported. No part of the hook is used for the reference.
"""
from __future__ import annotations

import base64
import io
import logging
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
STEPS = 6


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _canny_source() -> np.ndarray:
    img = np.zeros((128, 128, 3), np.uint8)
    img[24:100, 30:90] = (230, 200, 40)
    img[60:120, 70:110] = (20, 90, 250)
    return img


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class _DiffusionWrapper(torch.nn.Module):
    """ldm's DiffusionWrapper in "crossattn" mode; records each UNet call made during sampling."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet
        self.calls = []

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        from modules import shared

        cc = torch.cat(c_crossattn, 1)
        out = self.diffusion_model(x, t, context=cc)
        self.calls.append(dict(x=x.clone(), t=t.clone(), cc=cc.clone(), out=out.clone(),
                               step=shared.state.sampling_step, total=shared.state.sampling_steps,
                               hooked="forward" in self.diffusion_model.__dict__))
        return out


class _LatentDiffusion(torch.nn.Module):
    """The attributes of ldm's LatentDiffusion the WebUI and its extensions use: ``model.diffusion_model``,
    ``apply_model``, ``alphas_cumprod`` (ldm's "linear" schedule), ``parameterization``, ``first_stage_model``,
    ``encode_first_stage`` (a posterior), ``get_first_stage_encoding`` (sample * scale), ``decode_first_stage``."""

    parameterization = "eps"

    def __init__(self, unet, vae):
        super().__init__()
        from ldm.modules.diffusionmodules.util import make_beta_schedule

        self.model = _DiffusionWrapper(unet)
        self.first_stage_model = vae
        self.scale_factor = 0.18215
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32))
        self.encodes = []

    def apply_model(self, x_noisy, t, cond):
        return self.model(x_noisy, t, **cond)

    def encode_first_stage(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.first_stage_model.encode_moments(x))

    def get_first_stage_encoding(self, posterior):
        z = self.scale_factor * posterior.sample()
        self.encodes.append(z.clone())
        return z

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


class _CompVisDenoiser(torch.nn.Module):
    """k-diffusion's CompVisDenoiser (eps model, sigma <-> fractional t by log-sigma interpolation)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.sigmas = ((1 - model.alphas_cumprod) / model.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def forward(self, x, sigma, **kwargs):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(x * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return x + eps * -sigma[:, None, None, None]


def _make_sampler(model, cond, uncond, fail_at=None):
    """A txt2img ``p.sample``: Euler over STEPS sigmas with CFG; the step callback sets state.sampling_step = i
    after step i (A1111's callback_state)."""
    from modules import sd_samplers_cfg_denoiser, shared

    def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        den = sd_samplers_cfg_denoiser.CFGDenoiser(_CompVisDenoiser(model))
        ts = torch.linspace(999, 0, STEPS).round().long()
        sigmas = torch.cat([den.inner_model.sigmas[ts], torch.zeros(1)])
        shared.state.sampling_steps, shared.state.sampling_step = STEPS, 0
        g = torch.Generator().manual_seed(7)
        x = torch.randn(1, 4, 16, 16, generator=g) * sigmas[0]
        for i in range(STEPS):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("sampler interrupted")
            denoised = den(x, sigmas[i].expand(1), uncond, cond, 5.0)
            shared.state.sampling_step = i
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    return sample


@pytest.fixture(scope="module")
def webui(tmp_path_factory, one_torch_thread):
    if str(DOUBLE) not in sys.path:
        sys.path.append(str(DOUBLE))
    from webui_harness import WebUIDouble

    from lib_sdtoolkit.arch.keymaps import convert_unet_ldm_to_diffusers
    from lib_sdtoolkit.controlnet.cldm import ControlNet
    from lib_sdtoolkit.controlnet.models import convert_controlnet_ldm_to_diffusers
    from lib_sdtoolkit.files import save_safetensors
    from lib_sdtoolkit.samples import factory

    data = tmp_path_factory.mktemp("webui-data")
    w = WebUIDouble(str(ROOT), str(data))
    w.preload([])
    from modules import extensions, scripts, shared

    extensions.list_extensions()  # no other ControlNet installed
    shared.opts.data["sdtoolkit_controlnet_unit_count"] = 2
    w.load_scripts()

    cfg = factory.get_config("SD1", "tiny")
    mods = factory.build_modules("SD1")
    unet = mods["unet"]
    dunet = diffusers.UNet2DConditionModel(**cfg.diffusers_unet).eval()
    dunet.load_state_dict(convert_unet_ldm_to_diffusers(unet.state_dict(), "SD1", prefix=""), strict=True)
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    cn = ControlNet(hint_channels=3, **kw).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in cn.parameters():  # zero convs would make the residuals 0: random weights
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
    sd = {"control_model." + k: v.contiguous() for k, v in cn.state_dict().items()}
    (data / "models" / "ControlNet").mkdir(parents=True, exist_ok=True)
    save_safetensors(data / "models" / "ControlNet" / "control_tiny_canny.safetensors", sd)
    d = cfg.diffusers_unet
    dcn = diffusers.ControlNetModel(in_channels=4, block_out_channels=d["block_out_channels"],
                                    down_block_types=d["down_block_types"], layers_per_block=2,
                                    cross_attention_dim=d["cross_attention_dim"],
                                    attention_head_dim=d["attention_head_dim"]).eval()
    dcn.load_state_dict(convert_controlnet_ldm_to_diffusers(sd, "SD1"), strict=True)

    model = _LatentDiffusion(unet, mods["vae"]).eval()
    old = shared.sd_model
    shared.sd_model = model
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(False)
    import gradio as gr
    with gr.Blocks():
        runner.setup_ui()
    scripts.scripts_txt2img = runner
    ctx_dim = cfg.ldm_unet["context_dim"]
    cond = torch.randn(1, 8, ctx_dim, generator=g)
    uncond = torch.randn(1, 8, ctx_dim, generator=g)
    yield dict(w=w, model=model, unet=unet, dunet=dunet, dcn=dcn, runner=runner, cond=cond, uncond=uncond,
               data=data)
    shared.sd_model = old


def _script(runner):
    return runner.title_map["controlnet"]


def _txt2img(webui, alwayson, fail_at=None):
    """What /sdapi/v1/txt2img does with the request's alwayson_scripts (modules/api/api.py)."""
    from modules import processing
    from modules.api import api

    runner = webui["runner"]
    defaults = api.init_default_script_args(runner)
    args = api.init_script_args(alwayson, defaults, script_runner=runner)
    p = processing.StableDiffusionProcessingTxt2Img(webui["model"], runner, args, width=128, height=128)
    p.sample = _make_sampler(webui["model"], webui["cond"], webui["uncond"], fail_at)
    webui["model"].model.calls.clear()
    with closing(p):
        res = processing.process_images(p)
    return p, res


def _hint() -> torch.Tensor:
    from lib_sdtoolkit.controlnet import preprocessors as P

    edges = P.canny(_canny_source(), 100, 200)
    assert edges.max() == 255
    return torch.from_numpy(np.repeat(edges[:, :, None], 3, axis=2)).permute(2, 0, 1)[None].float() / 255.0


def _reference(webui, call, weight, uncond_zero=False):
    x, t, cc = call["x"], call["t"], call["cc"]
    with torch.no_grad():
        if weight is None:
            return webui["dunet"](x, t, cc).sample
        down, mid = webui["dcn"](x, t, cc, _hint().expand(x.shape[0], -1, -1, -1), return_dict=False)
        res = [r * weight for r in list(down) + [mid]]
        if uncond_zero:  # rows whose context is the negative prompt's get no control
            keep = torch.tensor([0.0 if torch.equal(c, webui["uncond"][0]) else 1.0 for c in cc]).view(-1, 1, 1, 1)
            res = [r * keep for r in res]
        return webui["dunet"](x, t, cc, down_block_additional_residuals=tuple(res[:-1]),
                              mid_block_additional_residual=res[-1]).sample


def _model_title(webui) -> str:
    from fastapi.testclient import TestClient

    c = TestClient(webui["w"].start_app(None))
    titles = c.get("/controlnet/model_list").json()["model_list"]
    title = [m for m in titles if m.startswith("control_tiny_canny [")]
    assert len(title) == 1, titles
    return title[0]


def _unit(webui, **over):
    d = {"enabled": True, "image": _png_b64(_canny_source()), "module": "canny", "model": _model_title(webui),
         "weight": 0.7, "processor_res": 128, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.25,
         "guidance_end": 0.6, "resize_mode": "Crop and Resize", "control_mode": "Balanced"}
    d.update(over)
    return d


def test_unit_panels_follow_setting_and_script_slots(webui):
    s = _script(webui["runner"])
    assert s.alwayson and s.args_from == 1 and s.args_to - s.args_from == 2  # 2 panels (setting), one dict each
    from modules.api import api
    defaults = api.init_default_script_args(webui["runner"])
    assert all(isinstance(v, dict) and v["enabled"] is False for v in defaults[s.args_from:s.args_to])


def test_txt2img_api_unit_adds_residuals_within_guidance_window(webui):
    unet = webui["unet"]
    p, res = _txt2img(webui, {"controlnet": {"args": [_unit(webui)]}})
    calls = webui["model"].model.calls
    assert len(calls) == STEPS and all(c["hooked"] for c in calls)
    # state.sampling_step lags one step (set by the sampler's callback after each step): 0,0,1,2,3,4 of 6
    assert [c["step"] for c in calls] == [0, 0, 1, 2, 3, 4]
    active = [0.25 <= c["step"] / c["total"] <= 0.6 for c in calls]
    assert active == [False, False, False, True, True, False]
    for c, on in zip(calls, active):
        ref = _reference(webui, c, 0.7 if on else None)
        assert torch.allclose(c["out"], ref, atol=3e-5), (on, (c["out"] - ref).abs().max())
        if on:  # the control really changed the prediction
            assert not torch.allclose(c["out"], _reference(webui, c, None), atol=1e-4)
    assert "forward" not in unet.__dict__  # restored after the generation
    assert "ControlNet" in p.extra_generation_params
    assert len(res.images) == 2 and res.images[1].size == (128, 128)  # the detected map is appended


def test_controlnet_is_more_important_no_control_on_uncond_rows(webui):
    p, _ = _txt2img(webui, {"controlnet": {"args": [_unit(webui, control_mode="ControlNet is more important",
                                                          guidance_start=0.0, guidance_end=1.0, weight=1.2)]}})
    calls = webui["model"].model.calls
    from lib_sdtoolkit.controlnet.hook import control_scales  # noqa: F401  (formula written out below)
    for c in calls[:3]:
        x, t, cc = c["x"], c["t"], c["cc"]
        with torch.no_grad():
            down, mid = webui["dcn"](x, t, cc, _hint().expand(2, -1, -1, -1), return_dict=False)
            keep = torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1)  # CFGDenoiser: cond row first, uncond last
            res = [r * 1.2 * 0.825 ** (12 - i) * keep for i, r in enumerate(list(down) + [mid])]
            ref = webui["dunet"](x, t, cc, down_block_additional_residuals=tuple(res[:-1]),
                                 mid_block_additional_residual=res[-1]).sample
        assert torch.allclose(c["out"], ref, atol=3e-5), (c["out"] - ref).abs().max()
    assert "forward" not in webui["unet"].__dict__


def test_bad_unit_skipped_with_warning_generation_runs(webui, caplog):
    bad = _unit(webui, model="no_such_controlnet [0123abcd]", guidance_start=0.0, guidance_end=1.0)
    good = _unit(webui, weight=0.4, guidance_start=0.0, guidance_end=1.0)
    with caplog.at_level(logging.WARNING, logger="sdtoolkit.controlnet"):
        _txt2img(webui, {"controlnet": {"args": [bad, good]}})
    msgs = [r.getMessage() for r in caplog.records if r.name == "sdtoolkit.controlnet"]
    assert any("unit 0" in m and "no_such_controlnet" in m for m in msgs), msgs
    calls = webui["model"].model.calls
    assert len(calls) == STEPS
    for c in calls[:2]:
        assert torch.allclose(c["out"], _reference(webui, c, 0.4), atol=3e-5)
    assert "forward" not in webui["unet"].__dict__


def test_only_bad_units_generation_runs_unhooked(webui, caplog):
    bad = _unit(webui, module="openpose")
    with caplog.at_level(logging.WARNING, logger="sdtoolkit.controlnet"):
        _txt2img(webui, {"controlnet": {"args": [bad]}})
    assert any("openpose" in r.getMessage() and "not available" in r.getMessage() for r in caplog.records)
    calls = webui["model"].model.calls
    assert len(calls) == STEPS and not any(c["hooked"] for c in calls)


def test_unet_restored_after_exception_mid_sampling(webui):
    unet = webui["unet"]
    with pytest.raises(RuntimeError, match="sampler interrupted"):
        _txt2img(webui, {"controlnet": {"args": [_unit(webui, guidance_start=0.0)]}}, fail_at=3)
    calls = webui["model"].model.calls
    assert len(calls) == 3 and all(c["hooked"] for c in calls)  # it was hooked while sampling ...
    assert "forward" not in unet.__dict__  # ... and closing(p) put the forward back
    p, _ = _txt2img(webui, {"controlnet": {"args": [_unit(webui, enabled=False)]}})
    assert not any(c["hooked"] for c in webui["model"].model.calls)


def test_tile_colorfix_through_generation(webui):
    """tile_colorfix in a generation: the VAE encodes the control image, and each UNet output is the ControlNet
    prediction with its x0 low frequencies replaced by those of that latent (formula written out)."""
    src = _canny_source()
    unit = _unit(webui, module="tile_colorfix", threshold_a=3, weight=0.5, guidance_start=0.0, guidance_end=1.0,
                 image=_png_b64(src))
    webui["model"].encodes.clear()
    _txt2img(webui, {"controlnet": {"args": [unit]}})
    assert len(webui["model"].encodes) == 1  # encoded once, reused every step
    z = webui["model"].encodes[0]
    hint = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255.0
    ac = torch.tensor(np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2))

    def box(v, k):
        vp = torch.nn.functional.pad(v, (k, k, k, k), mode="replicate")
        kern = torch.ones(v.shape[1], 1, 2 * k + 1, 2 * k + 1, dtype=v.dtype) / (2 * k + 1) ** 2
        return torch.nn.functional.conv2d(vp, kern, groups=v.shape[1])

    for c in webui["model"].model.calls:
        x, t, cc = c["x"], c["t"], c["cc"]
        with torch.no_grad():
            down, mid = webui["dcn"](x, t, cc, hint.expand(2, -1, -1, -1), return_dict=False)
            res = [r * 0.5 for r in list(down) + [mid]]
            eps = webui["dunet"](x, t, cc, down_block_additional_residuals=tuple(res[:-1]),
                                 mid_block_additional_residual=res[-1]).sample.double()
        a = ac[t.round().long()].view(-1, 1, 1, 1)
        xd = x.double()
        x0 = (xd - (1 - a).sqrt() * eps) / a.sqrt()
        x0 = x0 - box(x0, 3) + box(z.double().expand_as(x0), 3)
        fixed = (xd - a.sqrt() * x0) / (1 - a).sqrt()
        ref = (0.5 * fixed + 0.5 * eps).float()
        # the WebUI's alphas_cumprod is float32: near t=0, 1 - a carries ~1e-4 relative error
        assert torch.allclose(c["out"], ref, rtol=2e-4, atol=1e-4), (c["out"] - ref).abs().max()
        assert not torch.allclose(c["out"], eps.float(), rtol=1e-2, atol=1e-2)  # the fix changed the output


def test_webuiapi_calls_without_units_apply_none(webui, monkeypatch):
    """Issue 10, defect 4: through the PyPI ``webuiapi`` client, ``txt2img(controlnet_units=[u])`` then a plain
    ``txt2img()`` must apply no unit. webuiapi's ``alwayson_scripts={}`` default is one dict shared by all calls; it
    resets ControlNet (``"ControlNet": {"args": []}``) only when ``/sdapi/v1/scripts`` lists "controlnet m2m".
    The WebUI double's own /sdapi/v1 routes serve the requests over HTTP (uvicorn), filling the script args a
    request does not name with the defaults of the scripts' UI components, as the WebUI's API does."""
    webuiapi = pytest.importorskip("webuiapi")
    uvicorn = pytest.importorskip("uvicorn")
    import socket
    import threading
    import time

    from PIL import Image
    from modules import processing, scripts
    from modules.api import api as webui_api

    model = webui["model"]

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        return _make_sampler(model, webui["cond"], webui["uncond"])(conditioning, unconditional_conditioning,
                                                                   seeds, subseeds, subseed_strength, prompts)

    monkeypatch.setattr(processing.StableDiffusionProcessingTxt2Img, "sample", sample, raising=False)
    monkeypatch.setattr(scripts, "scripts_txt2img", webui["runner"])
    monkeypatch.setattr(scripts, "scripts_img2img", scripts.ScriptRunner())
    webui_api._ensure_ui(scripts.scripts_img2img, True)
    app = webui["w"].start_app(None, api=True)
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        for _ in range(400):
            if srv.started:
                break
            time.sleep(0.05)
        assert srv.started
        client = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        listed = client.get_scripts()
        assert "controlnet m2m" in listed["txt2img"] and "controlnet m2m" in listed["img2img"]
        assert client.has_controlnet
        unit = webuiapi.ControlNetUnit(image=Image.fromarray(_canny_source()), module="canny",
                                       model=_model_title(webui), weight=0.7, processor_res=128, threshold_a=100,
                                       threshold_b=200, guidance_start=0.25, guidance_end=0.6,
                                       resize_mode="Crop and Resize")
        calls = model.model.calls

        def run(units):
            calls.clear()
            kw = {"controlnet_units": units} if units else {}
            r = client.txt2img(prompt="", width=128, height=128, steps=STEPS, **kw)
            assert len(calls) == STEPS and len(r.images) >= 1
            return r, [c["hooked"] for c in calls]

        for round_ in range(2):
            r, hooked = run([unit])
            assert all(hooked), round_                                    # the unit hooked the UNet
            assert "control_tiny_canny" in r.info["extra_generation_params"]["ControlNet"]
            r, hooked = run(None)                                         # then a call without units
            assert not any(hooked), round_
            assert "ControlNet" not in r.info["extra_generation_params"]
            for c in calls:                                               # the plain UNet, not a stale hint
                assert torch.allclose(c["out"], _reference(webui, c, None), atol=3e-5)
        # a unit sent as disabled, and an explicit empty list, apply nothing either
        unit.enabled = False
        assert not any(run([unit])[1])
        assert not any(run(None)[1])
    finally:
        srv.should_exit = True
        th.join(10)


def test_conflicting_extension_registers_nothing(webui, tmp_path):
    """Runs last: it reloads the scripts with sd-webui-controlnet present."""
    from fastapi.testclient import TestClient
    from webui_harness import WebUIDouble

    from modules import extensions, scripts, shared

    data = tmp_path / "webui-data"
    (data / "extensions" / "sd-webui-controlnet").mkdir(parents=True)
    w = WebUIDouble(str(ROOT), str(data))
    w.preload([])
    try:
        extensions.list_extensions()
        w.load_scripts()
        assert not [d for d in scripts.scripts_data if d.path.endswith("sdtoolkit_controlnet.py")]
        runner = scripts.ScriptRunner()
        runner.initialize_scripts(False)
        assert "controlnet" not in [s.title().lower() for s in runner.scripts]
        assert "controlnet m2m" not in [s.title().lower() for s in runner.scripts]  # the real one registers it
        assert "sd-webui-controlnet" in shared.opts.data["sdtoolkit_controlnet_external"]
        c = TestClient(w.start_app(None))
        assert c.get("/controlnet/version").status_code == 404
        assert c.get("/controlnet/model_list").status_code == 404
        assert c.get("/sdtoolkit/v1/models").status_code == 200  # the toolkit's own routes are still there
    finally:
        extensions.extensions.clear()
        shared.opts.data["sdtoolkit_controlnet_external"] = ""
