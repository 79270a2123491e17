"""The fixture factory: layouts checked key by key against sd-mecha's published lists and the real modules, files
checked by reading them back with the safetensors library / torch.load, modules checked by strict loading."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors import safe_open

from lib_sdtoolkit.arch import keymaps
from lib_sdtoolkit.arch.layouts import LAYOUT_FILES, load_layout, load_layout_dtypes
from lib_sdtoolkit.samples import factory, gen_layouts

MECHA = {"SD1": "sd1-ldm", "SDXL": "sdxl-sgm"}


def _mecha_keys(mecha_layout, name, skip=("ema", "scheduler")):
    return {k: (tuple(v["shape"]), v["dtype"], bool(v.get("optional")))
            for comp, keys in mecha_layout(name).items() if comp not in skip for k, v in keys.items()}


@pytest.mark.parametrize("arch", ["SD1", "SDXL"])
def test_full_layout_equals_sd_mecha_key_list(arch, mecha_layout):
    ref = _mecha_keys(mecha_layout, MECHA[arch])
    ours = load_layout(arch)
    dtypes = load_layout_dtypes(arch)
    assert set(ours) <= set(ref)
    # what we lack is only what sd-mecha marks optional and real base files do not hold (SDXL's v-pred markers)
    assert {k for k in set(ref) - set(ours)} <= {k for k, v in ref.items() if v[2]}
    for k, shape in ours.items():
        assert ref[k][0] == shape, k
        assert ref[k][1] == dtypes.get(k, "float32"), k
    counts = {"SD1": 1131, "SDXL": 2515}  # released files: 686+248+197; 1680+248+197+390
    assert len(ours) == counts[arch]


def test_component_counts_of_real_files():
    sd1 = load_layout("SD1")
    assert sum(k.startswith("model.diffusion_model.") for k in sd1) == 686
    assert sum(k.startswith("first_stage_model.") for k in sd1) == 248
    assert sum(k.startswith("cond_stage_model.transformer.") for k in sd1) == 197
    xl = load_layout("SDXL")
    assert sum(k.startswith("model.diffusion_model.") for k in xl) == 1680
    assert sum(k.startswith("conditioner.embedders.0.transformer.") for k in xl) == 197
    assert sum(k.startswith("conditioner.embedders.1.model.") for k in xl) == 390
    sd2 = load_layout("SD2")  # OpenCLIP ViT-H: 24 blocks x 12 + 6
    assert sum(k.startswith("cond_stage_model.model.") for k in sd2) == 294
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)  # linear in SD2
    assert load_layout("SD1")["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    ref = load_layout("SDXL-refiner")
    assert ref["model.diffusion_model.label_emb.0.0.weight"] == (1536, 2560)
    assert sum(k.startswith("conditioner.embedders.0.model.") for k in ref) == 390
    assert load_layout("SD1-inpainting")["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert load_layout("SD1-instruct-pix2pix")["model.diffusion_model.input_blocks.0.0.weight"] == (320, 8, 3, 3)


def test_shipped_layouts_are_regenerated_identically():
    for arch, stem in LAYOUT_FILES.items():
        assert (gen_layouts.LAYOUT_DIR / f"{stem}.json.gz").read_bytes() == gen_layouts.layout_bytes(arch), arch


@pytest.mark.parametrize("arch", ["SD1", "SD2", "SDXL", "SDXL-refiner", "VAE"])
def test_tiny_has_exactly_the_keys_of_full(arch):
    tiny = factory.key_specs(arch, "tiny")
    full = load_layout(arch if arch != "VAE" else "VAE")
    assert [s.name for s in tiny] == list(full)
    for s in tiny:
        assert len(s.shape) == len(full[s.name]), s.name
        assert math.prod(s.shape) <= math.prod(full[s.name])


def test_ldm_module_names_are_the_file_names():
    # transformers 4.x keeps "text_model." in CLIP state dicts, as real checkpoints have it
    te = factory.build_text_encoder(factory.tiny_config("SD1").text_encoders[0], device="meta")
    assert all(k.startswith("text_model.") for k in te.state_dict())
    full = load_layout("SD1")
    unet = factory.build_ldm_unet("SD1", "full", device="meta")
    assert [keymaps.UNET_PREFIX + k for k in unet.state_dict()] == [k for k in full if k.startswith(keymaps.UNET_PREFIX)]


def test_safetensors_files_read_back(fixture_files):
    with safe_open(str(fixture_files["sd1"]), "pt") as f:
        keys = set(f.keys())
        assert keys == set(load_layout("SD1"))
        pos = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
        assert pos.dtype == torch.int64 and pos.tolist() == [list(range(77))]
        w = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
        assert w.dtype == torch.float32 and w.shape == (32, 4, 3, 3)
        assert 0.01 < w.std().item() < 0.03
    with safe_open(str(fixture_files["sd1_fp16"]), "pt") as f:
        assert f.get_tensor("first_stage_model.decoder.conv_in.weight").dtype == torch.float16
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
    with safe_open(str(fixture_files["sd1_bf16"]), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
    with safe_open(str(fixture_files["sdxl"]), "pt") as f:
        assert set(f.keys()) == set(load_layout("SDXL"))
    with safe_open(str(fixture_files["vae"]), "pt") as f:
        assert set(f.keys()) == set(load_layout("VAE"))
    with safe_open(str(fixture_files["sd1_inpainting"]), "pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [32, 9, 3, 3]


def test_ckpt_with_ema_junk_and_broken_position_ids(fixture_files, mecha_layout):
    obj = torch.load(fixture_files["sd1_ema_junk_ckpt"], map_location="cpu", weights_only=True)
    assert obj["epoch"] == 6 and obj["global_step"] == 470000
    sd = obj["state_dict"]
    ema = {k for k in sd if k.startswith("model_ema.")}
    assert ema == set(mecha_layout("sd1-ldm")["ema"])  # 686 dot-less copies + decay + num_updates
    assert sd["model_ema.num_updates"].dtype == torch.int32
    sched = set(mecha_layout("sd1-ldm")["scheduler"])
    assert sched <= set(sd)
    assert {"logvar", "loss.logvar"} <= set(sd) and any(k.startswith("loss.discriminator.") for k in sd)
    # the DDPM buffers are those of SD1's scaled-linear schedule (diffusers computes the same independently)
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(sd["alphas_cumprod"], sch.alphas_cumprod.float())
    torch.testing.assert_close(sd["betas"], sch.betas.float())
    pos = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert pos.dtype == torch.float32 and pos.shape == (1, 77)
    assert abs(pos[0, 76].item() - 75.9975) < 1e-3 and not torch.equal(pos, torch.arange(77.0)[None])
    u = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert sd[keymaps.ema_key_of(u)].shape == sd[u].shape and not torch.equal(sd[keymaps.ema_key_of(u)], sd[u])
    assert set(sd) - ema - sched - {"logvar"} - {k for k in sd if k.startswith("loss.")} == set(load_layout("SD1"))


def test_prefixed_vae_pickle(fixture_files):
    obj = torch.load(fixture_files["vae_prefixed_pt"], map_location="cpu", weights_only=True)
    assert set(obj["state_dict"]) == {"first_stage_model." + k for k in load_layout("VAE")}


def test_deterministic_per_seed(tmp_path):
    a = factory.write_checkpoint(tmp_path / "a.safetensors", "VAE", seed=5)
    b = factory.write_checkpoint(tmp_path / "b.safetensors", "VAE", seed=5)
    c = factory.write_checkpoint(tmp_path / "c.safetensors", "VAE", seed=6)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    # tensors depend on (seed, key) only: the VAE inside a checkpoint equals the bare VAE
    sd1 = factory.build_state_dict("SD1", seed=5)
    with safe_open(str(a), "pt") as f:
        assert torch.equal(f.get_tensor("decoder.conv_in.weight"), sd1["first_stage_model.decoder.conv_in.weight"])


def test_writer_refuses_to_overwrite(tmp_path):
    from lib_sdtoolkit.errors import SdToolkitError

    p = factory.write_checkpoint(tmp_path / "v.safetensors", "VAE")
    with pytest.raises(SdToolkitError):
        factory.write_checkpoint(p, "VAE")
    with pytest.raises(ValueError):
        factory.write_checkpoint(tmp_path / "v.txt", "VAE")
    with pytest.raises(ValueError):
        factory.build_state_dict("SD1", "full")
    with pytest.raises(ValueError):
        factory.get_config("SDXL", variant="inpainting")


def test_sd1_file_loads_strictly_into_real_modules_and_runs(fixture_files):
    with safe_open(str(fixture_files["sd1"]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    unet = factory.build_ldm_unet("SD1")
    unet.load_state_dict({k[len(keymaps.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(keymaps.UNET_PREFIX)},
                         strict=True)
    vae = factory.build_ldm_vae()
    vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")},
                        strict=True)
    te = factory.build_text_encoder(factory.tiny_config("SD1").text_encoders[0])
    p = "cond_stage_model.transformer."
    te.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, strict=False)
    with torch.no_grad():
        ctx = te(input_ids=torch.randint(0, 1000, (1, 77))).last_hidden_state
        eps = unet(torch.randn(1, 4, 8, 8), timesteps=torch.tensor([999]), context=ctx)
        img = vae.decode(eps)
    assert ctx.shape == (1, 77, 32) and img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert eps.abs().mean() > 1e-4


def test_sdxl_file_loads_into_diffusers_unet_and_openclip_g(fixture_files, tiny_modules):
    with safe_open(str(fixture_files["sdxl"]), "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    mods = tiny_modules("SDXL")
    unet = mods["unet"]
    conv = keymaps.convert_unet_ldm_to_diffusers(sd, "SDXL")
    assert conv.keys() == unet.state_dict().keys()
    for k, v in unet.state_dict().items():  # fp16 file vs fp32 module built from the same seed
        torch.testing.assert_close(conv[k], v, rtol=1e-3, atol=1e-3)
    cfg = factory.tiny_config("SDXL").diffusers_unet
    with torch.no_grad():
        l_out = mods["text_encoder"](input_ids=torch.randint(0, 1000, (1, 77)), output_hidden_states=True)
        g_out = mods["text_encoder_2"](input_ids=torch.randint(0, 1000, (1, 77)), output_hidden_states=True)
        ctx = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
        assert ctx.shape[-1] == cfg["cross_attention_dim"]
        cond = {"text_embeds": g_out.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=ctx, added_cond_kwargs=cond)
    assert out.sample.shape == (1, 4, 8, 8) and torch.isfinite(out.sample).all()


def test_refiner_and_sd2_modules_load(tiny_modules):
    for arch in ("SDXL-refiner", "SD2"):
        mods = tiny_modules(arch)  # build_modules loads every part with strict key checks
        assert "unet" in mods and "vae" in mods
    assert set(tiny_modules("SDXL-refiner")) == {"unet", "vae", "text_encoder_2"}


def test_sample_library(models_dir):
    files = sorted(p.relative_to(models_dir).as_posix() for p in models_dir.rglob("*") if p.is_file())
    assert files == ["Lora/sample-lora-sd15.safetensors", "Stable-diffusion/sd15-tiny.safetensors",
                     "Stable-diffusion/sdxl-tiny.safetensors", "VAE/vae-tiny-copy.safetensors",
                     "VAE/vae-tiny.safetensors"]
    assert (models_dir / "ControlNet").is_dir()
    from lib_sdtoolkit.lora.inspect_lora import inspect_lora
    lora = inspect_lora(models_dir / "Lora/sample-lora-sd15.safetensors")
    assert lora["base_model"] == "SD1" and lora["unmatched"] == 0 and lora["targets"]["unet"] > 0
    assert (models_dir / "VAE/vae-tiny.safetensors").read_bytes() == (models_dir / "VAE/vae-tiny-copy.safetensors").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.safetensors")}
    factory.write_sample_library(models_dir)  # existing files are left alone
    assert before == {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.safetensors")}
    with safe_open(str(models_dir / "Stable-diffusion/sdxl-tiny.safetensors"), "pt") as f:
        assert f.metadata() == {"sdtoolkit_sample": "1"}
        assert set(f.keys()) == set(load_layout("SDXL"))
