"""Prune: outputs read back with the safetensors library hold exactly the expected components, converted float
dtypes (ints kept), loadable into the real ldm modules; component extraction; CLI and API bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lib_sdtoolkit.cli import main
from lib_sdtoolkit.prune import PruneOptions, prune_file
from lib_sdtoolkit.samples import factory

SRC = "sd1_ema_junk_ckpt"  # SD1 .ckpt with model_ema.*, DDPM buffers, loss.*, broken float position_ids
PID = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _read(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="session")
def clean_sd1_keys():
    """The keys of an SD1 checkpoint as the real modules give them: no EMA, no junk."""
    return {s.name for s in factory.key_specs("SD1")}


@pytest.fixture(scope="session")
def source_sd(fixture_files):
    return torch.load(str(fixture_files[SRC]), weights_only=True, map_location="cpu")["state_dict"]


def test_prune_default_keeps_components_drops_ema_and_junk(tmp_path, fixture_files, clean_sd1_keys, source_sd):
    out = tmp_path / "pruned.safetensors"
    res = prune_file(fixture_files[SRC], out)
    sd, meta = _read(out)
    assert set(sd) == clean_sd1_keys
    assert not any(k.startswith(("model_ema.", "loss.", "betas", "alphas_cumprod", "logvar")) for k in sd)
    for k, t in sd.items():
        src = source_sd[k]
        if k == PID:
            assert t.dtype == src.dtype == torch.float32  # an index tensor: never converted unless fixed
            assert torch.equal(t, src)
        elif src.dtype.is_floating_point:
            assert t.dtype == torch.float16, k
            assert torch.equal(t, src.to(torch.float16)), k
        else:
            assert t.dtype == src.dtype and torch.equal(t, src)
    assert res.dropped["ema"] == sum(k.startswith("model_ema.") for k in source_sd)
    assert res.dropped["junk"] == len(set(source_sd) - clean_sd1_keys) - res.dropped["ema"]
    assert res.out_file_size == out.stat().st_size < res.in_file_size
    assert json.loads(meta["sdtoolkit_prune"])["dtype"] == "fp16"
    assert res.position_ids["state"] == "broken"


def test_keep_ema_fix_position_ids_bf16_and_real_modules_load(tmp_path, fixture_files, source_sd):
    out = tmp_path / "ema.safetensors"
    res = prune_file(fixture_files[SRC], out, PruneOptions(dtype="bf16", keep_ema=True, fix_position_ids=True))
    sd, _ = _read(out)
    ema = {k for k in source_sd if k.startswith("model_ema.")}
    assert ema <= set(sd)
    assert sd["model_ema.num_updates"].dtype == source_sd["model_ema.num_updates"].dtype == torch.int32
    assert sd["model_ema.decay"].dtype == torch.bfloat16
    assert sd[PID].dtype == torch.int64 and sd[PID].flatten().tolist() == list(range(77))
    assert res.position_ids["fixed"] and 76 in res.position_ids["wrong"]  # 75.9975 read as int is 75
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(sd[k], source_sd[k].to(torch.bfloat16))
    # the kept UNet and VAE are complete: the real ldm modules load them strictly
    unet = factory.build_ldm_unet("SD1")
    unet.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()
                          if k.startswith("model.diffusion_model.")}, strict=True)
    vae = factory.build_ldm_vae()
    vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in sd.items()
                         if k.startswith("first_stage_model.")}, strict=True)


def test_extract_vae_as_standalone_file(tmp_path, fixture_files, source_sd):
    out = tmp_path / "my.vae.safetensors"
    res = prune_file(fixture_files[SRC], out, PruneOptions(only=["vae"], dtype="keep"))
    sd, _ = _read(out)
    assert res.prefix_stripped == "first_stage_model."
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in sd)
    vae = factory.build_ldm_vae()
    vae.load_state_dict(sd, strict=True)  # what the WebUI's load_vae_dict feeds first_stage_model
    for k, t in sd.items():
        assert torch.equal(t, source_sd["first_stage_model." + k])
    # the plans of other choices (no file written): --keep-prefix keeps the checkpoint names; two components keep
    # their prefixes and nothing else is there
    from lib_sdtoolkit.files import open_model
    from lib_sdtoolkit.prune import plan_prune

    with open_model(fixture_files[SRC]) as r:
        prefixed = plan_prune(r, PruneOptions(only=["vae"], bare=False))
        two = plan_prune(r, PruneOptions(only="unet,text_encoder"))
        with pytest.raises(Exception, match="exactly one component"):
            plan_prune(r, PruneOptions(only="unet,vae", bare=True))
    assert all(e[1].startswith("first_stage_model.") for e in prefixed.entries)
    assert {e[1].split(".")[0] for e in two.entries} == {"model", "cond_stage_model"}
    assert set(two.kept) == {"unet", "text_encoder"}


def test_prune_to_ckpt_and_from_vae_file(tmp_path, fixture_files):
    out = tmp_path / "v.pt"
    prune_file(fixture_files["vae_prefixed_pt"], out, PruneOptions(bare=True))
    sd = torch.load(str(out), weights_only=True)["state_dict"]
    factory.build_ldm_vae().load_state_dict(sd, strict=True)
    assert all(t.dtype == torch.float16 for t in sd.values())


def test_cli_prune_and_bad_input(tmp_path, fixture_files, capsys):
    src = str(fixture_files[SRC])
    out = tmp_path / "o.safetensors"
    assert main(["prune", src, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "saved" in text and "dropped" in text and "position_ids are broken" in text
    assert main(["prune", src, "-o", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["prune", src, "-o", src]) == 2  # the input
    assert main(["prune", src, "-o", str(tmp_path / "x.safetensors"), "--only", "bogus"]) == 2
    assert "unknown component" in capsys.readouterr().err
    assert main(["prune", src, "-o", str(tmp_path / "x.safetensors"), "--only", "text_encoder_2"]) == 2
    assert "has no text_encoder_2" in capsys.readouterr().err
    assert main(["prune", src, "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["prune", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "y.safetensors")]) == 2
    junk = tmp_path / "junk.safetensors"
    from lib_sdtoolkit.files import save_safetensors
    save_safetensors(junk, {"foo.bar": torch.zeros(3)})
    assert main(["prune", str(junk), "-o", str(tmp_path / "z.safetensors")]) == 2
    assert "cannot tell what this file is" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prune", src, "-o", str(tmp_path / "w.safetensors"), "--dtype", "fp8"])
    assert e.value.code == 2
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob("*.tmp"))
    assert main(["prune", str(fixture_files["vae_prefixed_pt"]), "-o", str(tmp_path / "vae.safetensors"),
                 "--only", "vae", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefix_stripped"] == "first_stage_model."


def test_api_prune_paths(tmp_path, fixture_files):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router

    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    shutil.copy(fixture_files[SRC], root / "Stable-diffusion" / "big.ckpt")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    client = TestClient(app)
    r = client.post("/sdtoolkit/v1/prune", json={"path": "big.ckpt", "output": "big-pruned.safetensors"})
    assert r.status_code == 200, r.text
    assert (root / "Stable-diffusion" / "big-pruned.safetensors").exists()
    r = client.post("/sdtoolkit/v1/prune", json={"path": "big.ckpt", "output": "big.vae.safetensors",
                                                 "only": ["vae"]})
    assert r.status_code == 200 and r.json()["kind"] == "vae"
    assert (root / "VAE" / "big.vae.safetensors").exists()
    for body, code in (({"path": "big.ckpt", "output": "../escape.safetensors"}, 403),
                       ({"path": "big.ckpt", "output": str(tmp_path / "escape.safetensors")}, 403),
                       ({"path": "../big.ckpt", "output": "a.safetensors"}, 403),
                       ({"path": str(fixture_files[SRC]), "output": "a.safetensors"}, 403),
                       ({"path": "big.ckpt", "output": "big-pruned.safetensors"}, 409),
                       ({"path": "big.ckpt", "output": "a.safetensors", "dtype": "fp8"}, 422),
                       ({"path": "big.ckpt", "output": "a.txt"}, 422)):
        r = client.post("/sdtoolkit/v1/prune", json=body)
        assert r.status_code == code, (body, r.text)
    assert not (tmp_path / "escape.safetensors").exists() and not (tmp_path / "models" / "escape.safetensors").exists()
