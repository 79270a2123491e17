"""ControlNet: model files, conversion, the UNet hook and control modes, checked against diffusers.

Independent reference: diffusers' ``ControlNetModel`` (its own forward, loaded through our ldm->diffusers key map
with ``strict=True``) gives the residuals, and diffusers' ``UNet2DConditionModel`` (same UNet weights through the
factory's key map) consumes them via ``down_block_additional_residuals`` / ``mid_block_additional_residual``. Scales
come from the published formulas (weight, weight * 0.825 ** (12 - i)), written out here.
"""
from __future__ import annotations

import pytest
import torch

from lib_sdtoolkit.errors import ArchitectureError, ModelFileError

factory = pytest.importorskip("lib_sdtoolkit.samples.factory")
diffusers = pytest.importorskip("diffusers")

from lib_sdtoolkit.arch.keymaps import convert_unet_ldm_to_diffusers  # noqa: E402
from lib_sdtoolkit.controlnet.cldm import ControlNet  # noqa: E402
from lib_sdtoolkit.controlnet.hook import HookUnit, UnetHook, control_scales  # noqa: E402
from lib_sdtoolkit.controlnet.models import (ControlModelCache, convert_controlnet_ldm_to_diffusers,  # noqa: E402
                                             load_control_model)
from lib_sdtoolkit.controlnet.unit import ControlMode, HiResFixOption  # noqa: E402
from lib_sdtoolkit.files import save_safetensors  # noqa: E402

ATOL = 2e-5


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _cn_kwargs(cfg, **over):
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    kw.update(hint_channels=3, **over)
    return kw


def _diffusers_cn(cfg, sd_ldm, arch="SD1"):
    d = cfg.diffusers_unet
    dcn = diffusers.ControlNetModel(in_channels=4, block_out_channels=d["block_out_channels"],
                                    down_block_types=d["down_block_types"], layers_per_block=2,
                                    cross_attention_dim=d["cross_attention_dim"],
                                    attention_head_dim=d["attention_head_dim"],
                                    use_linear_projection=d.get("use_linear_projection", False)).eval()
    dcn.load_state_dict(convert_controlnet_ldm_to_diffusers(sd_ldm, arch), strict=True)
    return dcn


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rig(tmp_path_factory, one_torch_thread):
    cfg = factory.get_config("SD1", "tiny")
    unet = factory.build_ldm_unet("SD1", "tiny")
    _randomize(unet, 0)
    dunet = diffusers.UNet2DConditionModel(**cfg.diffusers_unet).eval()
    dunet.load_state_dict(convert_unet_ldm_to_diffusers(unet.state_dict(), "SD1", prefix=""), strict=True)
    d = tmp_path_factory.mktemp("cn")
    files, dcns = [], []
    for seed in (1, 2):
        cn = ControlNet(**_cn_kwargs(cfg)).eval()
        _randomize(cn, seed)
        sd = {"control_model." + k: v.contiguous() for k, v in cn.state_dict().items()}
        path = d / f"control_tiny_canny_{seed}.safetensors"
        save_safetensors(path, sd)
        files.append(path)
        dcns.append(_diffusers_cn(cfg, sd))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([421.0, 421.0])
    ctx = torch.randn(2, 8, 32, generator=g)
    hint = torch.rand(1, 3, 128, 128, generator=g)
    return dict(cfg=cfg, unet=unet, dunet=dunet, files=files, dcns=dcns, x=x, t=t, ctx=ctx, hint=hint, dir=d)


def _reference(rig, unit_scales, rows=None):
    """diffusers UNet output with the given per-unit scale lists (None = unit off) and optional per-row masks."""
    x, t, ctx, hint = rig["x"], rig["t"], rig["ctx"], rig["hint"].expand(2, -1, -1, -1)
    total = None
    with torch.no_grad():
        for dcn, scales, mask in zip(rig["dcns"], unit_scales, rows or [None] * len(unit_scales)):
            if scales is None:
                continue
            down, mid = dcn(x, t, ctx, hint, return_dict=False)
            res = [r * s for r, s in zip(list(down) + [mid], scales)]
            if mask is not None:
                res = [r * mask.view(-1, 1, 1, 1) for r in res]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        if total is None:
            return rig["dunet"](x, t, ctx).sample
        return rig["dunet"](x, t, ctx, down_block_additional_residuals=tuple(total[:-1]),
                            mid_block_additional_residual=total[-1]).sample


def _run(rig, units, step=None, total=None, uncond=None):
    unet = rig["unet"]
    hook = UnetHook(units)
    with hook.hook(unet):
        if step is not None:
            hook.set_step(step, total)
        if uncond is not None:
            hook.set_uncond(uncond)
        with torch.no_grad():
            return unet(rig["x"], rig["t"], rig["ctx"])


def test_ldm_file_loads_and_matches_diffusers_balanced(rig):
    model = load_control_model(rig["files"][0])
    assert model.family == "SD1" and model.num_outputs == 13 and model.source_format == "ldm"
    out = _run(rig, [HookUnit(model, rig["hint"], weight=0.8)])
    ref = _reference(rig, [[0.8] * 13, None])
    plain = _reference(rig, [None, None])
    assert (ref - plain).abs().max() > 1e-3  # the control really changes the output
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_prompt_more_important_soft_injection(rig):
    model = load_control_model(rig["files"][0])
    w = 1.3
    expected = [w * 0.825 ** (12 - i) for i in range(13)]
    assert control_scales(ControlMode.PROMPT, w, 13) == pytest.approx(expected)
    assert control_scales(ControlMode.PROMPT, 1.0, 10)[-1] == pytest.approx(0.825 ** 3)  # SDXL middle
    out = _run(rig, [HookUnit(model, rig["hint"], weight=w, control_mode=ControlMode.PROMPT)])
    torch.testing.assert_close(out, _reference(rig, [expected, None]), atol=ATOL, rtol=0)


def test_controlnet_more_important_drops_uncond_rows(rig):
    model = load_control_model(rig["files"][0])
    expected = [0.825 ** (12 - i) for i in range(13)]
    uncond = rig["ctx"][1:2]  # row 1 is the unconditional row
    out = _run(rig, [HookUnit(model, rig["hint"], control_mode=ControlMode.CONTROL)], uncond=uncond)
    ref = _reference(rig, [expected, None], rows=[torch.tensor([1.0, 0.0]), None])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    plain = _reference(rig, [None, None])
    torch.testing.assert_close(out[1], plain[1], atol=ATOL, rtol=0)
    assert (out[0] - plain[0]).abs().max() > 1e-3


def test_guidance_window_fraction_of_steps(rig):
    model = load_control_model(rig["files"][0])
    unit = HookUnit(model, rig["hint"], guidance_start=0.3, guidance_end=0.6)
    plain = _reference(rig, [None, None])
    on = _reference(rig, [[1.0] * 13, None])
    for step, active in ((0, False), (2, False), (3, True), (6, True), (7, False), (9, False)):
        out = _run(rig, [unit], step=step, total=10)
        torch.testing.assert_close(out, on if active else plain, atol=ATOL, rtol=0)


def test_two_units_sum(rig):
    m1, m2 = load_control_model(rig["files"][0]), load_control_model(rig["files"][1])
    out = _run(rig, [HookUnit(m1, rig["hint"], weight=0.7),
                     HookUnit(m2, rig["hint"], weight=1.2, control_mode=ControlMode.PROMPT)])
    ref = _reference(rig, [[0.7] * 13, [1.2 * 0.825 ** (12 - i) for i in range(13)]])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_restore_exact_also_on_error(rig):
    unet, model = rig["unet"], load_control_model(rig["files"][0])
    with torch.no_grad():
        before = unet(rig["x"], rig["t"], rig["ctx"])
    assert "forward" not in unet.__dict__
    with pytest.raises(RuntimeError, match="interrupted"):
        with UnetHook([HookUnit(model, rig["hint"])]).hook(unet):
            assert "forward" in unet.__dict__
            raise RuntimeError("interrupted")
    assert "forward" not in unet.__dict__
    with torch.no_grad():
        after = unet(rig["x"], rig["t"], rig["ctx"])
    assert torch.equal(before, after)


def test_hr_option(rig):
    model = load_control_model(rig["files"][0])
    hook = UnetHook([HookUnit(model, rig["hint"], hr_option=HiResFixOption.LOW_RES_ONLY)])
    hook.is_hr_pass = True
    assert hook.compute_control(rig["x"], rig["t"], rig["ctx"]) is None
    hook.is_hr_pass = False
    assert len(hook.compute_control(rig["x"], rig["t"], rig["ctx"])) == 13


def test_diffusers_unet_hook_matches(rig):
    model = load_control_model(rig["files"][1])
    dunet = rig["dunet"]
    with torch.no_grad():
        with UnetHook([HookUnit(model, rig["hint"], weight=0.5)]).hook(dunet):
            out = dunet(rig["x"], rig["t"], rig["ctx"]).sample
    ref = _reference(rig, [None, [0.5] * 13])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert "forward" not in dunet.__dict__


def test_diffusers_and_pth_files_load_same_weights(rig, tmp_path):
    dcn = rig["dcns"][0]
    p = tmp_path / "diffusers_controlnet.safetensors"
    save_safetensors(p, {k: v.contiguous() for k, v in dcn.state_dict().items()})
    a, b = load_control_model(rig["files"][0]), load_control_model(p)
    assert b.source_format == "diffusers" and b.family == "SD1"
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    pth = tmp_path / "control_sd15_tiny.pth"
    torch.save({k: v for k, v in load_control_model(rig["files"][0]).net.state_dict().items()}, pth)
    c = load_control_model(pth)  # bare ldm keys, no control_model. prefix, pickle (weights_only)
    assert all(torch.equal(sa[k], c.net.state_dict()[k]) for k in sa)


def test_wrong_architecture_unit_skipped_with_warning(rig, tmp_path):
    cfg = rig["cfg"]
    cn = ControlNet(**_cn_kwargs(cfg, context_dim=48)).eval()  # SD1 layout, other text width (like SD2 vs SD1)
    p = tmp_path / "control_other.safetensors"
    save_safetensors(p, {"control_model." + k: v.contiguous() for k, v in cn.state_dict().items()})
    bad, good = load_control_model(p), load_control_model(rig["files"][0])
    warnings = []
    hook = UnetHook([HookUnit(bad, rig["hint"], name="bad"), HookUnit(good, rig["hint"])], warn=warnings.append)
    with hook.hook(rig["unet"]):
        with torch.no_grad():
            out = rig["unet"](rig["x"], rig["t"], rig["ctx"])
    assert len(warnings) == 1 and "text context 48 vs 32" in warnings[0]
    torch.testing.assert_close(out, _reference(rig, [[1.0] * 13, None]), atol=ATOL, rtol=0)


def test_sdxl_diffusers_controlnet_loads_and_is_refused_on_sd1(rig, tmp_path):
    cfg = factory.get_config("SDXL", "tiny")
    u = cfg.diffusers_unet
    dcn = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=u["block_out_channels"], down_block_types=u["down_block_types"],
        layers_per_block=2, cross_attention_dim=u["cross_attention_dim"], attention_head_dim=u["attention_head_dim"],
        transformer_layers_per_block=u["transformer_layers_per_block"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=u["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=u["projection_class_embeddings_input_dim"],
        norm_num_groups=u.get("norm_num_groups", 32)).eval()
    _randomize(dcn, 3)
    p = tmp_path / "controlnet_sdxl_tiny.safetensors"
    save_safetensors(p, {k: v.contiguous() for k, v in dcn.state_dict().items()})
    # head counts are not visible in shapes; the shipped SDXL config assumes 64-channel heads (tiny uses 16)
    m = load_control_model(p, overrides={"attention_head_dim": u["attention_head_dim"],
                                         "addition_time_embed_dim": u["addition_time_embed_dim"],
                                         "norm_num_groups": u.get("norm_num_groups", 32)})
    assert m.family == "SDXL" and m.num_outputs == 10
    with pytest.raises(ArchitectureError, match="10 control outputs vs 13"):
        from lib_sdtoolkit.controlnet.models import check_compatible
        check_compatible(m, rig["unet"])
    # our ldm-convention forward of the diffusers modules == diffusers' own forward
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 6, cfg.diffusers_unet["cross_attention_dim"], generator=g)
    te = cfg.diffusers_unet["addition_time_embed_dim"]
    pooled = torch.randn(1, cfg.diffusers_unet["projection_class_embeddings_input_dim"] - 6 * te, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    hint = torch.rand(1, 3, 128, 128, generator=g)
    t = torch.tensor([300.0])
    with torch.no_grad():
        down, mid = dcn(x, t, ctx, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        return_dict=False)
        y = torch.cat([pooled, dcn.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=-1)
        ours = m(x, hint, t, ctx, y)
    for a, b in zip(ours, list(down) + [mid]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("keys,match", [
    ({"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, "Control-LoRA"),
    ({"conv_in.weight": torch.zeros(320, 192, 3, 3), "body.0.block1.weight": torch.zeros(320, 320, 3, 3)},
     "T2I-Adapter"),
    ({"adapter.body.0.resnets.0.block1.weight": torch.zeros(4, 4, 3, 3)}, "T2I-Adapter"),
])
def test_refused_kinds_are_named(tmp_path, keys, match):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, keys)
    with pytest.raises(ArchitectureError, match=match):
        load_control_model(p)


def test_not_a_controlnet(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ModelFileError, match="not a ControlNet"):
        load_control_model(p)


def test_lru_cache(rig):
    loads = []

    def loader(path, **kw):
        loads.append(path)
        return load_control_model(path, **kw)

    cache = ControlModelCache(1, loader=loader)
    a = cache.get(rig["files"][0])
    assert cache.get(rig["files"][0]) is a and len(loads) == 1
    cache.get(rig["files"][1])
    assert len(cache) == 1
    cache.get(rig["files"][0])
    assert len(loads) == 3
    cache.resize(0)
    assert len(cache) == 0


# ------------------------------------------------------------------------------------------- tile colour fix

def _box_by_conv(x, k):
    """Independent box filter: replicate-pad, then a conv with a normalised ones kernel per channel."""
    c = x.shape[1]
    kern = torch.full((c, 1, 2 * k + 1, 2 * k + 1), 1.0 / (2 * k + 1) ** 2, dtype=torch.float64)
    xp = torch.nn.functional.pad(x.double(), (k, k, k, k), mode="replicate")
    return torch.nn.functional.conv2d(xp, kern, groups=c)


def _colorfix_reference(eps, x, t, z_hint, k, weight, sharp=None, uncond_rows=()):
    """sd-webui-controlnet's colour fix written out from its formula, with diffusers' scaled-linear DDPM schedule."""
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear").alphas_cumprod.double()
    a = ac[t.round().long()].view(-1, 1, 1, 1)
    e, xt = eps.double(), x.double()
    x0 = (xt - torch.sqrt(1 - a) * e) / torch.sqrt(a)  # x_t = sqrt(a) x0 + sqrt(1-a) eps
    x0 = x0 - _box_by_conv(x0, k) + _box_by_conv(z_hint.double().expand_as(x0), k)
    if sharp is not None:
        s = sharp / 100.0
        for r in uncond_rows:
            x0[r] = s * _box_by_conv(x0[r:r + 1], k)[0] + (1 - s) * x0[r]
    fixed = (xt - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
    w = min(1.0, max(0.0, weight))
    return (w * fixed + (1 - w) * e).float()


def test_tile_colorfix_matches_formula(rig):
    model = load_control_model(rig["files"][0])
    g = torch.Generator().manual_seed(11)
    z_hint = torch.randn(1, 4, 16, 16, generator=g)
    seen = []

    def encode(pixels):
        seen.append(pixels.clone())
        return z_hint

    t = torch.tensor([421.3, 421.3])
    for weight, k in ((0.6, 3), (1.7, 5)):
        unit = HookUnit(model, rig["hint"], weight=weight, colorfix_variation=k)
        hook = UnetHook([unit], encode_latent=encode)
        with hook.hook(rig["unet"]), torch.no_grad():
            got = rig["unet"](rig["x"], t, rig["ctx"])
        with torch.no_grad():
            down, mid = rig["dcns"][0](rig["x"], t, rig["ctx"], rig["hint"].expand(2, -1, -1, -1), return_dict=False)
            res = [r * weight for r in list(down) + [mid]]
            eps = rig["dunet"](rig["x"], t, rig["ctx"], down_block_additional_residuals=tuple(res[:-1]),
                               mid_block_additional_residual=res[-1]).sample
        ref = _colorfix_reference(eps, rig["x"], t, z_hint, k, weight)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        assert not torch.allclose(got, eps, atol=1e-3)  # the fix really changed the prediction
    # the VAE saw the hint image mapped to [-1, 1] at the generation's pixel size
    assert seen[0].shape == (1, 3, 128, 128) and torch.allclose(seen[0], rig["hint"] * 2 - 1)


def test_tile_colorfix_sharp_on_uncond_rows_and_outside_guidance(rig):
    model = load_control_model(rig["files"][0])
    g = torch.Generator().manual_seed(12)
    z_hint = torch.randn(1, 4, 16, 16, generator=g)
    uc = rig["ctx"][1:2]
    unit = HookUnit(model, rig["hint"], weight=0.8, guidance_start=0.0, guidance_end=0.3, colorfix_variation=4,
                    colorfix_sharpness=150.0)  # sharpness outside the slider is the unit's concern, the maths scales
    hook = UnetHook([unit], encode_latent=lambda p: z_hint)
    t = rig["t"]
    with hook.hook(rig["unet"]), torch.no_grad():
        hook.set_uncond(uc)
        hook.set_step(9, 10)  # outside the window: no residuals, the colour fix still runs (as upstream)
        got = rig["unet"](rig["x"], t, rig["ctx"])
    with torch.no_grad():
        eps = rig["dunet"](rig["x"], t, rig["ctx"]).sample
    ref = _colorfix_reference(eps, rig["x"], t, z_hint, 4, 0.8, sharp=150.0, uncond_rows=(1,))
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    ref_nosharp = _colorfix_reference(eps, rig["x"], t, z_hint, 4, 0.8)
    assert torch.allclose(got[0], ref_nosharp[0], atol=1e-4) and not torch.allclose(got[1], ref_nosharp[1], atol=1e-3)


def test_tile_colorfix_off_without_encoder_or_for_v_models(rig):
    model = load_control_model(rig["files"][0])
    for kw in ({}, {"encode_latent": lambda p: p, "prediction": "v"}):
        msgs = []
        unit = HookUnit(model, rig["hint"], colorfix_variation=8)
        hook = UnetHook([unit], warn=msgs.append, **kw)
        with hook.hook(rig["unet"]), torch.no_grad():
            got = rig["unet"](rig["x"], rig["t"], rig["ctx"])
        assert len(msgs) == 1 and "colour fix off" in msgs[0]
        assert torch.allclose(got, _reference(rig, [[1.0] * 13]), atol=ATOL)


def test_prepare_units_carries_colorfix_sliders(rig, tmp_path):
    import numpy as np
    from lib_sdtoolkit.controlnet.registry import prepare_units
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.jobs.controlnet import model_resolver

    (tmp_path / "ControlNet").mkdir()
    import shutil
    shutil.copy(rig["files"][0], tmp_path / "ControlNet" / "control_tile.safetensors")
    host = StandaloneHost(tmp_path)
    img = np.random.default_rng(1).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    units = [{"enabled": True, "module": "tile_colorfix", "model": "control_tile", "image": img, "threshold_a": 5},
             {"enabled": True, "module": "tile_colorfix+sharp", "model": "control_tile", "image": img,
              "threshold_a": 99, "threshold_b": 0.5}]
    prepared = prepare_units(units, model_resolver(host), ControlModelCache(2), 128, 128)
    a, b = prepared.units
    assert (a.colorfix_variation, a.colorfix_sharpness) == (5, None)
    assert (b.colorfix_variation, b.colorfix_sharpness) == (8, 0.5)  # 99 outside 3..32 -> slider default 8
    assert torch.allclose(a.hint, torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)  # identity map
