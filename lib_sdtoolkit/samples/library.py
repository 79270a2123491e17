"""The sample library ``serve --sample`` and the "Create sample library" button write: a WebUI-like models folder
on which every tab of the app does its job on the first click, written in seconds.

* ``Stable-diffusion/sd15-tiny.safetensors`` and ``sd15-tiny-finetune.safetensors``: two SD1 checkpoints of the same
  family (the second is the first plus a small UNet/text-encoder drift, as a fine-tune is, saved as a trainer saves
  it: fp32 with the UNet's EMA copy, so Prune has something to prune), so the default merge, LoRA extraction and
  block-weight presets work; ``sdxl-tiny.safetensors``: an SDXL one, to show the refusal of a
  cross-family merge. All at tiny width with every key of the real file (layouts: :mod:`.tiny_layouts`).
* ``VAE/vae-tiny.safetensors``: an ldm VAE with the real key layout whose weights are *constructed* (not trained) so
  that decode(encode(image)) is recognisably the image: the encoder averages 8x8 pixels into the latent's first three
  channels (standardised over the image, as its GroupNorm does), the decoder upsamples them back with a small blur
  and restores the sample image's per-channel mean and spread; every residual branch and attention output is zero,
  so each block passes its input through. A different image comes back with the sample's levels per channel.
  ``VAE/vae-tiny-copy.safetensors`` is a byte-identical copy (for dedup). Both SD1 checkpoints hold this VAE too.
* ``Lora/sample-lora-sd15.safetensors``: a kohya LoRA (attention + conv, rank 4) for the SD1 checkpoints.
* ``ControlNet/control_v11p_sd15_canny-tiny.safetensors``: an ldm ControlNet (``cldm`` layout) for the SD1 ones.
* ``samples/sample.png`` (a drawn landscape, 320x256) and ``samples/sample-latent.safetensors`` (its latent through
  the sample VAE, scaled by 0.18215, in the Tiled VAE tab's latent-file format).

Files already there are left alone. Nothing is downloaded; no transformers / diffusers import.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

PathLike = Union[str, Path]

SAMPLE_META = {"sdtoolkit_sample": "1"}
SD_SCALE = 0.18215
IMAGE_SIZE = (320, 256)  # width, height: multiples of 64
#: the names the library writes, relative to the models folder
NAMES = {
    "sd15": "Stable-diffusion/sd15-tiny.safetensors",
    "sd15-finetune": "Stable-diffusion/sd15-tiny-finetune.safetensors",
    "sdxl": "Stable-diffusion/sdxl-tiny.safetensors",
    "vae": "VAE/vae-tiny.safetensors",
    "vae-copy": "VAE/vae-tiny-copy.safetensors",
    "lora": "Lora/sample-lora-sd15.safetensors",
    "controlnet": "ControlNet/control_v11p_sd15_canny-tiny.safetensors",
    "image": "samples/sample.png",
    "latent": "samples/sample-latent.safetensors",
}
# the linear range of SiLU: SiLU(B + W*n) = B + W*n within 1e-3 for |n| < 6
_SILU_B, _SILU_W = 10.0, 0.5
_LATENT_GAIN = 1.0 / SD_SCALE  # unscaled latent = gain * standardised colour, so the scaled latent has unit spread


# ------------------------------------------------------------------------------------------------ the image
def sample_image():
    """A drawn landscape (sky gradient, sun, two mountain ranges, a lake, a house): recognisable at a glance,
    with edges for the ControlNet preprocessors and smooth areas for the VAE."""
    from PIL import Image, ImageDraw

    w, h = IMAGE_SIZE
    import numpy as np

    t = (np.arange(h, dtype=np.float32) / (h * 0.6))[:, None, None]  # sky: deep blue to pale orange
    sky = np.array([40, 90, 200], np.float32) + t * np.array([200, 110, -60], np.float32)
    img = Image.fromarray(np.broadcast_to(sky.clip(0, 255), (h, w, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((220, 30, 280, 90), fill=(255, 220, 90))
    d.polygon([(0, 170), (70, 80), (130, 150), (190, 70), (270, 160), (320, 120), (320, 200), (0, 200)],
              fill=(90, 80, 110))
    d.polygon([(0, 190), (60, 140), (150, 185), (240, 130), (320, 180), (320, 205), (0, 205)], fill=(50, 110, 60))
    d.rectangle((0, 200, w, h), fill=(40, 90, 160))
    for y in range(208, h, 12):
        d.line((20 + (y * 7) % 60, y, 120 + (y * 11) % 90, y), fill=(150, 190, 230), width=2)
    d.rectangle((40, 150, 90, 195), fill=(200, 60, 50))
    d.polygon([(34, 152), (65, 122), (96, 152)], fill=(120, 40, 30))
    d.rectangle((58, 170, 72, 195), fill=(60, 35, 20))
    return img


def image_tensor(img) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1] (the VAE's input range)."""
    import numpy as np

    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
    return (a.permute(2, 0, 1).unsqueeze(0) / 127.5) - 1.0


# ------------------------------------------------------------------------------------------------ the VAE
def _identity_conv(conv: torch.nn.Conv2d, n: int, gain: float = 1.0, bias: Optional[torch.Tensor] = None) -> None:
    """``conv`` passes its first ``n`` input channels to its first ``n`` outputs (centre tap), all else zero."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.weight.shape[-1] // 2
        for c in range(n):
            conv.weight[c, c, k, k] = gain
        conv.bias.zero_()
        if bias is not None:
            conv.bias[:n] = bias


def _pass_through(module: torch.nn.Module) -> None:
    """Every ldm ResnetBlock / AttnBlock inside ``module`` returns its input (its residual branch outputs zero);
    a 1x1 shortcut that changes the width keeps the first channels."""
    with torch.no_grad():
        for m in module.modules():
            name = type(m).__name__
            if name == "ResnetBlock":
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
                if m.in_channels != m.out_channels:
                    short = m.nin_shortcut if hasattr(m, "nin_shortcut") else m.conv_shortcut
                    _identity_conv(short, min(m.in_channels, m.out_channels))
            elif name == "AttnBlock":
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()


def build_sample_vae(image=None, seed: int = 3) -> torch.nn.Module:
    """The constructed tiny ldm VAE (see the module docstring); ``image`` (PIL) sets the colour levels the decoder
    restores (default: :func:`sample_image`)."""
    from . import factory

    torch.manual_seed(seed)  # the unused weights (zeroed branches' convs, norms) are the default init's
    vae = factory.build_ldm_vae("tiny")
    enc, dec = vae.encoder, vae.decoder
    _pass_through(vae)
    x = image_tensor(image if image is not None else sample_image())
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    with torch.no_grad():
        _identity_conv(enc.conv_in, 3)
        for level in enc.down:
            if hasattr(level, "downsample"):
                w = level.downsample.conv.weight
                w.zero_()
                level.downsample.conv.bias.zero_()
                for c in range(3):  # ldm pads (0, 1, 0, 1), then a stride-2 3x3: taps [0:2, 0:2] average 2x2
                    w[c, c, 0:2, 0:2] = 0.25
        # norm_out (GroupNorm: colour channels 0..2 share group 0) then SiLU, kept in its linear range
        enc.norm_out.weight.zero_()
        enc.norm_out.bias.zero_()
        enc.norm_out.weight[:3] = _SILU_W
        enc.norm_out.bias[:3] = _SILU_B
        g = _LATENT_GAIN / _SILU_W
        _identity_conv(enc.conv_out, 3, g, torch.full((3,), -_SILU_B * g))
        with torch.no_grad():  # log-variance channels: a near-deterministic posterior
            enc.conv_out.bias[4:] = -20.0
        _identity_conv(vae.quant_conv, 8)
        vae.quant_conv.bias[4:] = 0.0
        _identity_conv(vae.post_quant_conv, 4)
        _identity_conv(dec.conv_in, 3)
        blur = torch.tensor([0.25, 0.5, 0.25])
        for level in dec.up:
            if hasattr(level, "upsample"):
                w = level.upsample.conv.weight
                w.zero_()
                level.upsample.conv.bias.zero_()
                for c in range(3):  # nearest x2, then a [1 2 1]/4 blur in both directions
                    w[c, c] = torch.outer(blur, blur)
        dec.norm_out.weight.zero_()
        dec.norm_out.bias.zero_()
        dec.norm_out.weight[:3] = _SILU_W
        dec.norm_out.bias[:3] = _SILU_B
        # out = mean + std * standardised colour, in [-1, 1]
        _identity_conv(dec.conv_out, 3, 1.0, None)
        for c in range(3):
            dec.conv_out.weight[c, c, 1, 1] = std[c] / _SILU_W
            dec.conv_out.bias[c] = mean[c] - _SILU_B * std[c] / _SILU_W
    return vae.eval()


def encode_latent(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean of ``x`` through ``vae``, scaled by 0.18215 (what the Tiled VAE encode job stores)."""
    with torch.no_grad():
        return vae.encode_moments(x)[:, :4] * SD_SCALE


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint(arch: str, seed: int, vae_sd: Optional[Dict[str, torch.Tensor]] = None,
                drift: Optional[Tuple[int, float]] = None, training_output: bool = False,
                base: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """A tiny ``arch`` checkpoint with the factory's values (``factory.write_checkpoint(..., seed, fp16)`` gives the
    same tensors); ``vae_sd`` replaces its ``first_stage_model.*``; ``drift=(seed, scale)`` adds a deterministic
    drift to the UNet and text-encoder weights (a fine-tune of the same model). ``training_output``: fp32 with the
    UNet's EMA copy (``model_ema.*``), as a trainer saves it (what Prune is for). ``base``: the same checkpoint
    already built (its tensors are the starting point instead of generating them again)."""
    from ..arch.keymaps import UNET_PREFIX, ema_key_of
    from . import factory
    from .tiny_layouts import tiny_layout

    out: Dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(drift[0]) if drift is not None else None
    dtype_out = torch.float32 if training_output else torch.float16
    for key, shape, dtype in tiny_layout(arch):  # module order: the drift's draws follow it
        natural = getattr(torch, dtype)
        t = base[key].to(dtype_out) if base is not None and key in base else \
            factory.make_tensor(key, shape, seed, dtype_out, natural)
        if gen is not None and t.is_floating_point() and not key.startswith("first_stage_model."):
            t = (t.float() + torch.randn(shape, generator=gen) * (0.02 * drift[1])).to(dtype_out)
        out[key] = t
        if training_output and key.startswith(UNET_PREFIX) and t.is_floating_point():
            ema_gen = gen if gen is not None else torch.Generator().manual_seed(seed)
            out[ema_key_of(key)] = (t.float() + torch.randn(shape, generator=ema_gen) * 2e-4).to(dtype_out)
    if training_output:
        out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        out["model_ema.num_updates"] = torch.tensor(20000, dtype=torch.int32)
    if vae_sd is not None:
        for k, v in vae_sd.items():
            key = "first_stage_model." + k
            if key not in out:
                raise AssertionError(f"sample VAE key {k} is not in the {arch} layout")
            out[key] = v.to(dtype_out).contiguous()
    return dict(sorted(out.items()))


def _controlnet_state_dict(seed: int = 5) -> Dict[str, torch.Tensor]:
    """An ldm ControlNet for the tiny SD1 UNet (the cldm layout, ``control_model.`` keys), seeded values."""
    import contextlib
    import io

    from ..controlnet.cldm import ControlNet
    from . import factory

    cfg = factory.get_config("SD1", "tiny")
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    with contextlib.redirect_stdout(io.StringIO()), torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(hint_channels=3, **kw).state_dict().items()}
    return {"control_model." + k: factory.make_tensor("control_model." + k, s, seed, torch.float16)
            for k, s in sorted(shapes.items())}


def write_sample_library(models_dir: PathLike, progress: Optional[Callable[[str, int, int], None]] = None
                         ) -> Dict[str, Path]:
    """Write the sample library under ``models_dir`` (see the module docstring); returns ``{name: path}`` of
    :data:`NAMES`. ``progress(step, done, total)`` is told each file."""
    from .. import files

    root = Path(models_dir)
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet", "samples"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    paths = {k: root / v for k, v in NAMES.items()}
    steps = list(NAMES)
    done = [0]

    def tick(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(name, done[0], len(steps))

    img = sample_image()
    if not paths["image"].exists():
        tmp = paths["image"].with_name(paths["image"].name + ".tmp")
        img.save(tmp, format="PNG")
        tmp.replace(paths["image"])
    tick("image")
    vae = build_sample_vae(img)
    vae_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    vae_meta = {**SAMPLE_META, "sdtoolkit_sample_vae": "constructed: 8x8 average encoder, blur-upsampling decoder"}
    if not paths["vae"].exists():
        files.save_safetensors(paths["vae"], vae_sd, vae_meta)
    tick("vae")
    if not paths["vae-copy"].exists():
        tmp = paths["vae-copy"].with_name(paths["vae-copy"].name + ".tmp")
        shutil.copyfile(paths["vae"], tmp)
        tmp.replace(paths["vae-copy"])
    tick("vae-copy")
    if not paths["latent"].exists():
        lat = encode_latent(vae.float(), image_tensor(img))
        files.save_safetensors(paths["latent"], {"latent": lat.float().contiguous()},
                               {"sdtoolkit.latent_scaled": "true", "sdtoolkit.scaling_factor": repr(SD_SCALE)})
    tick("latent")
    sd15: Optional[Dict[str, torch.Tensor]] = None
    for name, arch, seed, drift in (("sd15", "SD1", 1, None), ("sd15-finetune", "SD1", 1, (11, 0.3)),
                                    ("sdxl", "SDXL", 2, None)):
        if not paths[name].exists():
            # the fine-tune starts from the released fp16 weights (generated once)
            sd = _checkpoint(arch, seed, vae_sd if arch == "SD1" else None, drift,
                             training_output=name == "sd15-finetune", base=sd15 if name == "sd15-finetune" else None)
            if name == "sd15":
                sd15 = sd
            files.save_safetensors(paths[name], sd, SAMPLE_META)
        tick(name)
    if not paths["lora"].exists():
        from ..lora.synth import attention_and_conv, make_lora_state_dict

        with files.open_model(paths["sd15"]) as r:
            shapes = {k: i.shape for k, i in r.infos().items()}
        sd = make_lora_state_dict(shapes.get, "SD1", rank=4, seed=4, name_filter=attention_and_conv,
                                  dtype=torch.float16)
        files.save_safetensors(paths["lora"], sd, {**SAMPLE_META, "ss_output_name": "sample-lora-sd15",
                                                   "ss_network_dim": "4", "ss_network_module": "networks.lora",
                                                   "ss_base_model_version": "sd_v1"})
    tick("lora")
    if not paths["controlnet"].exists():
        files.save_safetensors(paths["controlnet"], _controlnet_state_dict(), SAMPLE_META)
    tick("controlnet")
    return paths


def sample_files(models_dir: PathLike) -> Dict[str, Path]:
    """``{name: path}`` of the library's files that exist under ``models_dir``."""
    root = Path(models_dir)
    return {k: root / v for k, v in NAMES.items() if (root / v).is_file()}


__all__ = ["write_sample_library", "sample_files", "sample_image", "build_sample_vae", "NAMES", "IMAGE_SIZE"]
