"""``vae encode`` / ``vae decode`` on real VAE files (conftest's tiny SD VAE, bare and first_stage_model.*),
checked against the ldm modules run directly with the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.files import open_model


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image
    yy, xx = np.mgrid[0:48, 0:64]
    a = np.stack([yy * 5, xx * 4, (yy + xx) * 2], -1).clip(0, 255).astype(np.uint8)
    p = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(a).save(p)
    return p


def test_encode_then_decode_matches_ldm_modules(fixture_files, image_file, tmp_path, capsys):
    from PIL import Image

    from lib_sdtoolkit.tiled_vae.vae import from_pil, load_vae
    vae_file = fixture_files["vae"]
    lat = tmp_path / "lat.safetensors"
    assert cli.main(["vae", "encode", str(image_file), "--vae", str(vae_file), "-o", str(lat),
                     "--tile-size", "16", "--quiet"]) == 0
    with open_model(lat) as r:
        assert r.keys() == ["latent"] and r.metadata["sdtoolkit.latent_scaled"] == "true"
        z = r.get("latent")
    assert tuple(z.shape) == (1, 4, 6, 8)
    vae = load_vae(str(vae_file))
    with torch.no_grad():
        ref = vae.quant_conv(vae.encoder(from_pil(Image.open(image_file))))[:, :4] * 0.18215
    assert torch.allclose(z, ref, atol=1e-5)

    out_t = tmp_path / "tiled.png"
    out_f = tmp_path / "full.png"
    assert cli.main(["vae", "decode", str(lat), "--vae", str(vae_file), "-o", str(out_t), "--tile-size", "16",
                     "--quiet"]) == 0
    assert cli.main(["vae", "decode", str(lat), "--vae", str(vae_file), "-o", str(out_f), "--full", "--quiet"]) == 0
    a = np.asarray(Image.open(out_t)).astype(int)
    b = np.asarray(Image.open(out_f)).astype(int)
    assert a.shape == (48, 64, 3)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of fp32 round-off at most
    # never overwrite
    assert cli.main(["vae", "decode", str(lat), "--vae", str(vae_file), "-o", str(out_t), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_checkpoint_prefixed_vae_and_errors(fixture_files, tmp_path, capsys):
    from lib_sdtoolkit.tiled_vae.vae import load_vae, save_latent
    a = load_vae(str(fixture_files["vae"]))
    b = load_vae(str(fixture_files["vae_prefixed_pt"]))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bad = tmp_path / "bad.safetensors"
    save_latent(str(bad), torch.zeros(1, 4, 4, 4), True, 0.18215)
    rc = cli.main(["vae", "decode", str(bad), "--vae", str(tmp_path / "missing.safetensors"),
                   "-o", str(tmp_path / "x.png"), "--quiet"])
    assert rc == 2 and capsys.readouterr().err.startswith("error:")


def _host(fixture_files):
    from lib_sdtoolkit.host import FolderHost
    return FolderHost({"vae": [str(fixture_files["vae"].parent)]})


def _saved_latent(tmp_path):
    from lib_sdtoolkit.tiled_vae.vae import save_latent
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 6, 5, generator=g)
    p = tmp_path / "z.safetensors"
    save_latent(str(p), z, True, 0.18215)
    return p, z


def test_route_decode_equals_full_decode(fixture_files, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from lib_sdtoolkit.server import make_router
    from fastapi import FastAPI
    host = _host(fixture_files)
    app = FastAPI()
    app.include_router(make_router(host))
    client = TestClient(app)
    p, z = _saved_latent(tmp_path)
    b64 = base64.b64encode(p.read_bytes()).decode()
    name = fixture_files["vae"].name
    r1 = client.post("/sdtoolkit/v1/vae/decode", json={"vae": name, "latent_safetensors_b64": b64, "tile_size": 16,
                                                        "device": "cpu"})
    r2 = client.post("/sdtoolkit/v1/vae/decode", json={"vae": name, "latent": z.tolist(), "full": True,
                                                        "device": "cpu"})
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    assert "tiles of 16x16 px" in r1.json()["plan"]
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(r1.json()["image"])))).astype(int)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(r2.json()["image"])))).astype(int)
    assert a.shape == (48, 40, 3) and np.abs(a - b).max() <= 1
    bad = client.post("/sdtoolkit/v1/vae/decode", json={"vae": name})
    assert 400 <= bad.status_code < 500 and "latent" in bad.json()["detail"]


def test_tab_decode_side_by_side_and_encode(fixture_files, tmp_path):
    import gradio as gr
    from PIL import Image

    from lib_sdtoolkit.ui import tiled_vae_tab
    host = _host(fixture_files)
    with gr.Blocks():
        tiled_vae_tab.build(host)
    p, _ = _saved_latent(tmp_path)
    ticks = []
    img, full, report = tiled_vae_tab.run_decode(
        host, {"vae_choice": f"[vae] {fixture_files['vae'].name}", "vae_path": "", "latent_file": str(p),
               "tile_size": 16, "fast": False, "compare": True, "device": "cpu"},
        lambda v, desc=None: ticks.append((v, desc)))
    assert img is not None and full is not None, report
    assert "max |d| = 0/255" in report or "max |d| = 1/255" in report
    assert ticks and ticks[-1][0] == 1.0 and ticks[-1][1].startswith("tiled decode")
    out, rep = tiled_vae_tab.run_encode(host, {"vae_choice": "", "vae_path": fixture_files["vae"].name,
                                               "image": Image.new("RGB", (32, 24), (200, 30, 9)), "tile_size": 16,
                                               "fast": False, "device": "cpu"})
    assert out and "latent (1, 4, 3, 4)" in rep
    _, _, err = tiled_vae_tab.run_decode(host, {"vae_choice": "", "vae_path": fixture_files["vae"].name,
                                                "latent_file": None, "tile_size": 0, "fast": False,
                                                "compare": False, "device": "cpu"})
    assert "latent" in err


# ------------------------------------------------------------------------------- the jobs: one result per face

def _client(host):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.server import make_router

    app = FastAPI()
    app.include_router(make_router(host))
    return TestClient(app)


def test_decode_cli_api_and_tab_give_the_same_png(fixture_files, tmp_path, capsys):
    """vae-decode: the CLI's -o file, the API's base64 PNG and the tab's image are the same bytes."""
    import base64
    import io

    import gradio as gr
    from PIL import Image

    from lib_sdtoolkit.ui import tiled_vae_tab

    host = _host(fixture_files)
    lat, _ = _saved_latent(tmp_path)
    cli_out = tmp_path / "cli.png"
    assert cli.main(["vae", "decode", str(lat), "--vae", str(fixture_files["vae"]), "-o", str(cli_out),
                     "--tile-size", "16", "--device", "cpu", "--quiet"]) == 0
    assert f"{cli_out}: 40x48 px" in capsys.readouterr().out
    r = _client(host).post("/sdtoolkit/v1/vae/decode", json={
        "vae": fixture_files["vae"].name, "latent_safetensors_b64": base64.b64encode(lat.read_bytes()).decode(),
        "tile_size": 16, "device": "cpu"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"image", "plan", "width", "height"}
    api_png = base64.b64decode(r.json()["image"])
    with gr.Blocks():
        tiled_vae_tab.build(host)
    img, _, html = tiled_vae_tab.run_decode(host, {"vae_choice": f"[vae] {fixture_files['vae'].name}",
                                                   "vae_path": "", "latent_file": str(lat), "tile_size": 16,
                                                   "fast": False, "compare": False, "device": "cpu"})
    assert img is not None, html
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert cli_out.read_bytes() == api_png == buf.getvalue()
    # and it is the ldm decoder's own output (to 8-bit rounding)
    full = _client(host).post("/sdtoolkit/v1/vae/decode", json={
        "vae": fixture_files["vae"].name, "latent_safetensors_b64": base64.b64encode(lat.read_bytes()).decode(),
        "full": True, "device": "cpu"}).json()
    a = np.asarray(Image.open(cli_out)).astype(int)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(full["image"])))).astype(int)
    assert full["plan"] == "full decode" and np.abs(a - b).max() <= 1


def test_encode_cli_api_and_tab_give_the_same_file(fixture_files, image_file, tmp_path, capsys):
    """vae-encode: the CLI's -o file, the API's latent_safetensors_b64 and the tab's download are the same bytes."""
    import base64

    import gradio as gr
    from PIL import Image

    from lib_sdtoolkit.ui import tiled_vae_tab

    host = _host(fixture_files)
    cli_out = tmp_path / "cli.safetensors"
    assert cli.main(["vae", "encode", str(image_file), "--vae", str(fixture_files["vae"]), "-o", str(cli_out),
                     "--tile-size", "16", "--device", "cpu", "--quiet"]) == 0
    assert "latent (1, 4, 6, 8) (scaled by 0.18215)" in capsys.readouterr().out
    r = _client(host).post("/sdtoolkit/v1/vae/encode", json={
        "vae": fixture_files["vae"].name, "image_b64": base64.b64encode(image_file.read_bytes()).decode(),
        "tile_size": 16, "device": "cpu"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["shape"], body["scaled"], body["scaling_factor"]) == ([1, 4, 6, 8], True, 0.18215)
    with gr.Blocks():
        tiled_vae_tab.build(host)
    out, html = tiled_vae_tab.run_encode(host, {"vae_choice": f"[vae] {fixture_files['vae'].name}", "vae_path": "",
                                                "image": Image.open(image_file), "tile_size": 16, "fast": False,
                                                "device": "cpu"})
    assert out, html
    tab_bytes = open(out, "rb").read()
    assert cli_out.read_bytes() == base64.b64decode(body["latent_safetensors_b64"]) == tab_bytes
    with open_model(cli_out) as rd:
        assert rd.metadata["sdtoolkit.vae"] == fixture_files["vae"].name   # a name, never a local path


@pytest.mark.parametrize("path", ["/sdtoolkit/v1/vae/decode", "/sdtoolkit/v1/vae/encode"])
def test_vae_routes_unknown_fields_and_the_gate(fixture_files, tmp_path, path):
    """Per route: an unknown field and the CLI-only fields (a path to read, an output to write) are 422; the VAE
    name goes through the gate: '..' and an absolute path outside the model folders 403, a missing model 404."""
    import base64

    host = _host(fixture_files)
    client = _client(host)
    data = ({"latent": torch.zeros(1, 4, 4, 4).tolist()} if path.endswith("decode") else
            {"image_b64": base64.b64encode(_png_bytes()).decode()})
    ok = client.post(path, json={"vae": fixture_files["vae"].name, "device": "cpu", **data})
    assert ok.status_code == 200, ok.text
    for extra in ({"tile_sise": 64}, {"output": "x.png"}, {"overwrite": True}, {"budget_mb": 10},
                  {"latent_file" if path.endswith("decode") else "image": str(fixture_files["vae"])}):
        r = client.post(path, json={"vae": fixture_files["vae"].name, **data, **extra})
        assert r.status_code == 422, (extra, r.text)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(fixture_files["vae"].read_bytes())
    for vae, status in (("../" + fixture_files["vae"].name, 403), ("sub/../../x.safetensors", 403),
                        (str(outside), 403), ("missing-vae", 404), ("missing/vae.safetensors", 404)):
        r = client.post(path, json={"vae": vae, "device": "cpu", **data})
        assert r.status_code == status, (vae, r.status_code, r.text)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_job_refuses_a_latent_path_on_a_host_that_is_not_trusted(fixture_files, tmp_path):
    """The latent file field is the CLI's; through the job layer on a confined host it meets the gate."""
    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.errors import AccessDeniedError

    lat, _ = _saved_latent(tmp_path)
    with pytest.raises(AccessDeniedError):
        jobs.run("vae-decode", _host(fixture_files), {"vae": fixture_files["vae"].name, "latent_file": str(lat),
                                                      "device": "cpu"})
