"""The 16-channel Flux/SD3 VAE through the tiled VAE (issue 13, item 4) and Flux files on every face (item 5).

Reference: diffusers' ``AutoencoderKL`` built from a config at tiny width (16 latent channels, no quant convs, as
Flux's ``vae/config.json`` has them), run whole; its scale/shift are what diffusers' Flux pipeline applies
(``latents / scaling_factor + shift_factor`` before decoding). The same weights are written in BFL's
``ae.safetensors`` names (ldm), in diffusers' names and inside a Flux all-in-one checkpoint (``vae.``).
"""
from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.arch import keymaps
from lib_sdtoolkit.files import open_model, save_safetensors
from lib_sdtoolkit.samples import flux
from lib_sdtoolkit.tiled_vae import TiledVAEConfig, plan_for
from lib_sdtoolkit.tiled_vae.vae import decode, encode, load_vae, save_latent

SCALE, SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def vae16(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=SCALE, shift_factor=SHIFT).eval()
    d = tmp_path_factory.mktemp("vae16")
    sd = ref.state_dict()
    assert not any("quant_conv" in k for k in sd)
    ldm = keymaps.convert_vae_diffusers_to_ldm(sd)
    aio = {k: v for k, v in flux.state_dict("all-in-one", "schnell", dtype=torch.float32).items()
           if not k.startswith("vae.")}
    aio.update({"vae." + k: v for k, v in ldm.items()})
    files = {"ae": save_safetensors(d / "ae.safetensors", ldm),
             "diffusers": save_safetensors(d / "diffusion_pytorch_model.safetensors", sd),
             "all-in-one": save_safetensors(d / "flux1-schnell-aio.safetensors", aio)}
    return ref, files


@pytest.fixture(scope="module")
def diffusers_refs(vae16):
    """(latent, diffusers' full decode of it, image, diffusers' full encode of it): the same inputs and the same
    reference for every layout, so computed once (diffusers' full decode and encode were half of each case)."""
    ref, _ = vae16
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 16, 14, 10, generator=g)
    img = torch.rand(1, 3, 112, 80, generator=g) * 2 - 1
    with torch.no_grad():
        want = ref.decode(lat / SCALE + SHIFT).sample
        zref = (ref.encode(img).latent_dist.mean - SHIFT) * SCALE
    return lat, want, img, zref


@pytest.mark.parametrize("layout", ["ae", "diffusers", "all-in-one"])
def test_tiled_decode_and_encode_equal_diffusers_full(vae16, diffusers_refs, layout):
    _, files = vae16
    lat, want, img, zref = (t.clone() for t in diffusers_refs)
    v = load_vae(str(files[layout]))
    assert (v.scaling_factor, v.shift_factor) == (SCALE, SHIFT)
    cfg = TiledVAEConfig(tile_px=32)
    assert plan_for(v.decoder, lat.shape, cfg).describe().count("tiles of 32x32 px") == 1
    tiled = decode(v, lat, cfg)
    torch.testing.assert_close(tiled, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(decode(v, lat, full=True), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(encode(v, img, cfg), zref, rtol=0, atol=2e-5)


def test_latent_channels_checked_both_ways(vae16, fixture_files):
    from lib_sdtoolkit.errors import InvalidInputError

    v16 = load_vae(str(vae16[1]["ae"]))
    with pytest.raises(InvalidInputError, match="has 4 channels but .* decodes 16-channel latents"):
        decode(v16, torch.zeros(1, 4, 8, 8))
    v4 = load_vae(str(fixture_files["vae"]))
    with pytest.raises(InvalidInputError, match="16-channel latents come from the Flux/SD3 VAE"):
        decode(v4, torch.zeros(1, 16, 8, 8))


def test_vae_cli_encode_decode_flux_ae(vae16, tmp_path, capsys):
    """CLI encode (tiled) -> latent file with Flux's factors -> CLI decode tiled and full: one image."""
    from PIL import Image

    ref, files = vae16
    yy, xx = np.mgrid[0:64, 0:48]
    img = tmp_path / "in.png"
    Image.fromarray(np.stack([yy * 4, xx * 5, (yy + xx) * 2], -1).clip(0, 255).astype(np.uint8)).save(img)
    lat = tmp_path / "lat.safetensors"
    assert cli.main(["vae", "encode", str(img), "--vae", str(files["ae"]), "-o", str(lat), "--tile-size", "32",
                     "--quiet"]) == 0
    with open_model(lat) as r:
        assert r.metadata["sdtoolkit.scaling_factor"] == repr(SCALE)
        assert r.metadata["sdtoolkit.shift_factor"] == repr(SHIFT)
        z = r.get("latent")
    from lib_sdtoolkit.tiled_vae.vae import from_pil
    with torch.no_grad():
        zref = (ref.encode(from_pil(Image.open(img))).latent_dist.mean - SHIFT) * SCALE
    assert z.shape == (1, 16, 8, 6)
    torch.testing.assert_close(z, zref, rtol=0, atol=2e-5)
    out_t, out_f = tmp_path / "t.png", tmp_path / "f.png"
    assert cli.main(["vae", "decode", str(lat), "--vae", str(files["all-in-one"]), "-o", str(out_t),
                     "--tile-size", "32", "--quiet"]) == 0
    assert cli.main(["vae", "decode", str(lat), "--vae", str(files["diffusers"]), "-o", str(out_f), "--full",
                     "--quiet"]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out_t, out_f))
    with torch.no_grad():
        want = ref.decode(z / SCALE + SHIFT).sample
    w8 = ((want[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)
    assert a.shape == (64, 48, 3) and np.abs(a - b).max() <= 1 and np.abs(a - w8).max() <= 1


# ------------------------------------------------------------------------------------------------ faces

@pytest.fixture()
def lib(tmp_path, vae16, monkeypatch):
    """A models folder as Forge Neo keeps Flux: transformer / all-in-one files among the checkpoints, ae among
    the VAEs; its host and an API client."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    ck = root / "Stable-diffusion"
    flux.write(ck / "flux1-dev.safetensors", "bfl", "dev", dtype=torch.float8_e4m3fn)
    flux.write(ck / "flux1-dev-b.safetensors", "bfl", "dev", seed=1)
    shutil.copy(vae16[1]["all-in-one"], ck / "flux1-schnell-aio.safetensors")
    shutil.copy(vae16[1]["ae"], root / "VAE" / "ae.safetensors")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    return host, root, TestClient(app)


def test_flux_files_listed_and_accepted_by_every_face(lib, tmp_path, capsys):
    from lib_sdtoolkit.ui.inspect_tab import run_inspect
    from lib_sdtoolkit.ui.merge_tab import block_table, run_merge
    from lib_sdtoolkit.ui.prune_tab import run_prune

    host, root, client = lib
    names = {p.name for p in host.list_models("checkpoint")}
    assert {"flux1-dev.safetensors", "flux1-dev-b.safetensors", "flux1-schnell-aio.safetensors"} <= names
    assert "ae.safetensors" in {p.name for p in host.list_models("vae")}
    # inspect: CLI, API, tab
    rc = cli.main(["inspect", str(root / "Stable-diffusion" / "flux1-dev.safetensors"), "--json"])
    c = json.loads(capsys.readouterr().out)
    r = client.get("/sdtoolkit/v1/inspect", params={"path": "flux1-dev.safetensors", "kind": "checkpoint"})
    tab = run_inspect(host, "[checkpoint] flux1-dev.safetensors", "")[3]
    assert rc == 0 and r.status_code == 200 and c == r.json() == tab
    assert (c["architecture"], c["variant"], c["layout"]) == ("Flux.1", "dev", "bfl")
    # merge with Flux block weights: API and tab give the same file
    blocks = ",".join(str(round(i / 57, 4)) for i in range(58))
    body = {"model_a": "flux1-dev.safetensors", "model_b": "flux1-dev-b.safetensors", "blocks": blocks,
            "dtype": "fp8_e4m3fn", "output": "api.safetensors", "save_metadata": False}
    r = client.post("/sdtoolkit/v1/merge", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["architecture"] == "Flux.1" and r.json()["block_ratios"]["S37"] == 1.0
    ok, text, rep = run_merge(host, dict(body, output="tab.safetensors"))
    assert rep is not None, text
    ck = root / "Stable-diffusion"
    assert (ck / "api.safetensors").read_bytes() == (ck / "tab.safetensors").read_bytes()
    df, msg = block_table(host, "flux1-dev.safetensors", "GRAD_V", "", 0.5, "")
    assert msg == "Flux.1: 57 UNet blocks + BASE" and list(df["block"])[:2] == ["BASE", "D00"]
    assert list(df["block"])[-1] == "S37"
    # prune of the all-in-one: T5 dropped on request (API and tab)
    body = {"path": "flux1-schnell-aio.safetensors", "output": "api-prune.safetensors", "dtype": "keep",
            "only": ["transformer", "vae", "text_encoder"]}
    r = client.post("/sdtoolkit/v1/prune", json=body)
    assert r.status_code == 200, r.text
    assert list(r.json()["dropped"]) == ["text_encoder_2"]
    msg, tab = run_prune(host, {"choice": "[checkpoint] flux1-schnell-aio.safetensors", "path": "",
                                "only": ["transformer", "vae", "text_encoder"], "dtype": "keep", "keep_ema": False,
                                "keep_junk": False, "fix_position_ids": False, "bare": False,
                                "output": "tab-prune.safetensors", "overwrite": False})
    assert tab is not None, msg
    assert (ck / "api-prune.safetensors").read_bytes() == (ck / "tab-prune.safetensors").read_bytes()
    # vae decode through the API with the ae file and with the all-in-one checkpoint: one image
    save_latent(str(tmp_path / "l.safetensors"), torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(2)),
                scaled=True, factor=SCALE)
    b64 = base64.b64encode((tmp_path / "l.safetensors").read_bytes()).decode()
    imgs = []
    for vae in ("ae.safetensors", "flux1-schnell-aio.safetensors"):
        r = client.post("/sdtoolkit/v1/vae/decode", json={"vae": vae, "latent_safetensors_b64": b64,
                                                           "tile_size": 32, "device": "cpu"})
        assert r.status_code == 200, r.text
        imgs.append(r.json()["image"])
    assert imgs[0] == imgs[1]


def test_sd3_and_gguf_refused_by_the_merge_route_with_a_clear_message(lib, mecha_layout):
    host, root, client = lib
    ck = root / "Stable-diffusion"
    sd3 = {k: torch.zeros(2, 2) if len(v["shape"]) >= 2 else torch.zeros(2)
           for k, v in mecha_layout("sd3-comfyui")["diffuser"].items()}
    save_safetensors(ck / "sd3_medium.safetensors", sd3)
    (ck / "flux1-dev-Q4_K_S.safetensors").write_bytes(b"GGUF" + bytes(20))
    r = client.post("/sdtoolkit/v1/merge", json={"model_a": "sd3_medium.safetensors",
                                                  "model_b": "sd3_medium.safetensors", "output": "x.safetensors"})
    assert 400 <= r.status_code < 500 and "merging SD3 is not supported yet" in r.json()["detail"]
    r = client.post("/sdtoolkit/v1/merge", json={"model_a": "flux1-dev.safetensors",
                                                  "model_b": "flux1-dev-Q4_K_S.safetensors",
                                                  "output": "y.safetensors"})
    assert 400 <= r.status_code < 500 and "GGUF files are not supported" in r.json()["detail"]
    assert not (ck / "x.safetensors").exists() and not (ck / "y.safetensors").exists()
