"""Every job route, checked against the one gate: an unknown body field is a 422 (never silently dropped), and
every field that names a model file is refused when it leaves the model folders (403) or names nothing (404).

The routes are found from the router itself (``jobs.faces.add_route`` records each one), so a new job route is
covered as soon as it exists; it only needs a minimal valid body in ``BODIES`` (the test fails until it has one).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_sdtoolkit.host import StandaloneHost
from lib_sdtoolkit.server import make_router

def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_PNG = _png()

#: a minimal valid body per job (names from the session's sample library)
BODIES = {
    "merge": {"model_a": "sd15-tiny", "model_b": "sd15-tiny.safetensors", "alpha": 0.25},
    "merge-save-current": {},
    "merge-restore": {},
    "lora-extract": {"tuned": "sd15-tiny", "base": "sd15-tiny.safetensors", "rank": 2, "output": "x.safetensors"},
    "lora-bake": {"checkpoint": "sd15-tiny", "loras": ["sample-lora-sd15"], "output": "y.safetensors"},
    "lora-inspect": {"lora": "sample-lora-sd15"},
    "lora-resize": {"lora": "sample-lora-sd15", "rank": 1, "output": "z.safetensors"},
    "lora-merge": {"loras": ["sample-lora-sd15"], "output": "m.safetensors"},
    "lora-convert": {"lora": "sample-lora-sd15", "to": "diffusers", "output": "conv.safetensors"},
    "vae-decode": {"vae": "vae-tiny", "latent": [[[0.1] * 4] * 4] * 4, "tile_size": 16},
    "vae-encode": {"vae": "vae-tiny", "image_b64": _PNG},
    "prune": {"path": "sd15-tiny", "output": "jobroutes-pruned.safetensors"},
    "hash": {"paths": ["vae-tiny"], "algos": ["crc32"]},
    "dedup": {"kind": "vae"},
    "compare": {"models": ["sd15-tiny", "sd15-tiny.safetensors"]},
    "history": {},
    "history-rerun": {"entry": "0000000000"},
    "recipe": {"model": "sd15-tiny"},
}
#: jobs that need a loaded model: on the standalone app they answer 422 whatever the body
NEEDS_LOADED_MODEL = {"merge-save-current", "merge-restore"}


@pytest.fixture(scope="module")
def env(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("jobroutes") / "models"
    for f in Path(models_dir).rglob("*"):
        if f.is_file():
            dst = root / f.relative_to(models_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst)
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    outside = root.parent / "outside.safetensors"
    outside.write_bytes((root / "Stable-diffusion" / "sd15-tiny.safetensors").read_bytes())
    host = StandaloneHost(models_dir=root)
    router = make_router(host, strict=True)
    app = FastAPI()
    app.include_router(router)
    return {"client": TestClient(app), "routes": dict(router.sdtoolkit_job_routes), "outside": outside,
            "root": root}


def test_every_job_route_has_a_sample_body(env):
    assert env["routes"], "no job routes were registered"
    missing = sorted(spec.name for spec in env["routes"].values() if spec.name not in BODIES)
    assert missing == [], f"add a minimal body for these job routes to BODIES: {missing}"


def test_unknown_fields_are_refused_on_every_job_route(env):
    for path, spec in env["routes"].items():
        body = dict(BODIES.get(spec.name, {}), alhpa=0.3)  # the typo the issue saw merged at the default
        r = env["client"].post(path, json=body)
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert "alhpa" in r.text, (path, r.text)


def test_every_file_field_goes_through_the_gate(env):
    checked = 0
    for path, spec in env["routes"].items():
        if spec.name in NEEDS_LOADED_MODEL:
            r = env["client"].post(path, json=BODIES[spec.name])
            assert r.status_code == 422 and "model" in r.json()["detail"], (path, r.text)
            continue
        base = BODIES[spec.name]
        for field in spec.request.fields():
            if not field.model or not field.api:
                continue
            cases = {"../../etc/passwd": 403, str(env["outside"]): 403, "no-such-model-anywhere": 404,
                     "Stable-diffusion/../../outside.safetensors": 403}
            for value, want in cases.items():
                body = dict(base, **{field.name: [value] if field.is_list else value})
                r = env["client"].post(path, json=body)
                assert r.status_code == want, (path, field.name, value, r.status_code, r.text)
                checked += 1
    assert checked >= 4 * 3  # merge alone names model_a, model_b, model_c, bake_vae


def test_a_valid_body_runs(env):
    """The sample bodies are valid (so the refusals above come from the checked field, not a bad body)."""
    r = env["client"].post("/sdtoolkit/v1/merge", json=dict(BODIES["merge"], output="jobroutes.safetensors"))
    assert r.status_code == 200, r.text
    assert (env["root"] / "Stable-diffusion" / "jobroutes.safetensors").is_file()


def test_the_hosts_device_is_the_default_and_a_bad_one_is_named(env):
    """``--sdtoolkit-device`` (preload.py) reaches the jobs: the WebUI host's device is what a request without
    ``device`` uses; a device this machine lacks is refused naming the flag, before any file is written."""
    from types import SimpleNamespace

    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.errors import InvalidInputError
    from lib_sdtoolkit.host import webui_host_from

    paths = SimpleNamespace(models_path=str(env["root"]), data_path=str(env["root"].parent))
    host = webui_host_from(paths, SimpleNamespace(sdtoolkit_device="cuda:99"))
    assert host.device == "cuda:99"
    with pytest.raises(InvalidInputError, match="--sdtoolkit-device"):
        jobs.run("merge", host, dict(BODIES["merge"], output="dev.safetensors"))
    assert not (env["root"] / "Stable-diffusion" / "dev.safetensors").exists()
    # the request's own device wins over the host's
    rep = jobs.run("merge", host, dict(BODIES["merge"], output="dev.safetensors", device="cpu"))
    assert rep.to_dict()["name"] == "dev.safetensors"
    auto = webui_host_from(paths, SimpleNamespace(sdtoolkit_device="auto"))
    assert auto.compute_device() in ("cpu", "cuda", "mps")
