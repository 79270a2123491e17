"""ControlNet units, weight-free preprocessors, the sd-webui-controlnet routes (driven by the PyPI ``webuiapi``
client against a real uvicorn server), unit preparation with bad input, and the CLI."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lib_sdtoolkit.controlnet import preprocessors as P
from lib_sdtoolkit.controlnet.unit import ControlMode, ControlNetUnit, HiResFixOption, ResizeMode
from lib_sdtoolkit.errors import InvalidInputError


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- units

def test_unit_defaults_match_upstream():
    u = ControlNetUnit()
    assert (u.enabled, u.module, u.model, u.weight, u.resize_mode, u.processor_res, u.threshold_a,
            u.guidance_start, u.guidance_end, u.control_mode, u.hr_option, u.pixel_perfect) == \
        (False, "none", "None", 1.0, ResizeMode.INNER_FIT, -1, -1, 0.0, 1.0, ControlMode.BALANCED,
         HiResFixOption.BOTH, False)


def test_unit_from_dict_strings_ints_aliases():
    u = ControlNetUnit.from_dict({"enabled": True, "module": "canny", "resize_mode": "Inner Fit (Scale to Fit)",
                                  "control_mode": 2, "guidance": 0.7, "lowvram": True, "input_image": "abc",
                                  "threshold_a": 500, "threshold_b": 150, "processor_res": -1, "unknown": 1})
    assert u.resize_mode == ResizeMode.INNER_FIT and u.control_mode == ControlMode.CONTROL
    assert u.guidance_end == 0.7 and u.low_vram is True and u.image == "abc"
    assert u.threshold_a == 100 and u.threshold_b == 150 and u.processor_res == 512  # out of range -> default
    assert ControlNetUnit.from_dict({"resize_mode": 2}).resize_mode == ResizeMode.OUTER_FIT
    assert ControlNetUnit.from_dict({"resize_mode": "Outer Fit (Shrink to Fit)"}).resize_mode == ResizeMode.OUTER_FIT
    assert ControlNetUnit.from_dict({"control_mode": "My prompt is more important"}).control_mode == \
        ControlMode.PROMPT
    with pytest.raises(InvalidInputError, match="guidance_start"):
        ControlNetUnit.from_dict({"guidance_start": 0.8, "guidance_end": 0.2})
    with pytest.raises(InvalidInputError, match="control_mode"):
        ControlNetUnit.from_dict({"control_mode": "loud"})
    with pytest.raises(InvalidInputError, match="weight"):
        ControlNetUnit.from_dict({"weight": "heavy"})


def test_webuiapi_unit_dict_is_accepted():
    webuiapi = pytest.importorskip("webuiapi")
    img = Image.new("RGB", (8, 8), "white")
    d = webuiapi.ControlNetUnit(image=img, module="canny", model="control_x [12345678]", control_mode=1,
                                threshold_a=64, threshold_b=128).to_dict()
    u = ControlNetUnit.from_dict(d)
    assert u.enabled and u.control_mode == ControlMode.PROMPT and u.resize_mode == ResizeMode.OUTER_FIT
    assert (u.threshold_a, u.threshold_b, u.processor_res) == (64, 128, 512)
    assert P.decode_image(u.image).shape == (8, 8, 3)


# ------------------------------------------------------------------------------------------ preprocessors

def _square(n=64, lo=20, hi=39):
    img = np.zeros((n, n, 3), np.uint8)
    img[lo:hi + 1, lo:hi + 1] = 255
    return img


def test_canny_follows_opencv_nms_rules():
    # A step edge gives equal Sobel magnitude (4*255) on both sides. OpenCV keeps a pixel when m > previous and
    # m >= next along the gradient, so the edge lands on the dark pixel before a rising edge (col 19) and on the
    # bright pixel before a falling edge (col 39); same for rows.
    e = P.canny(_square(), 100, 200)
    assert set(np.nonzero(e[30])[0]) == {19, 39}
    assert set(np.nonzero(e[:, 30])[0]) == {19, 39}
    assert P.canny(_square(), 1100, 1200)[30].max() == 0  # mid-edge magnitude 1020 does not pass
    assert P.canny(_square(), 2040, 2040).max() == 0  # L1 magnitude of a 0/255 image is at most 8*255


def test_canny_hysteresis_keeps_weak_pixels_connected_to_strong():
    img = np.zeros((40, 40), np.uint8)
    img[:, 20:] = 60          # weak edge: |gx| = 4*60 = 240
    img[:10, 20:] = 200       # strong part on the same edge line: 800
    img[25:, 5:8] = 0
    e = P.canny(img, 200, 500)
    col = 19
    assert e[5, col] == 255 and e[30, col] == 255  # the weak part is connected to the strong part
    img2 = np.zeros((40, 40), np.uint8)
    img2[:, 20:] = 60
    assert P.canny(img2, 200, 500).max() == 0  # weak only: nothing


def test_gaussian_blur_matches_scipy_reflect101():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    x = rng.random((40, 30)).astype(np.float32) * 255
    for sigma in (0.5, 2.0, 6.0):
        r = (int(round(sigma * 4 * 2 + 1)) | 1) // 2
        ref = ndimage.gaussian_filter(x.astype(np.float64), sigma, mode="mirror", truncate=r / sigma)
        np.testing.assert_allclose(P.gaussian_blur(x, sigma), ref, atol=1e-3)


def test_simple_preprocessors_by_formula():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert np.array_equal(P.run_preprocessor("invert", img), 255 - img)
    th = P.run_preprocessor("threshold", img, 64, 100)
    assert np.array_equal(th[:, :, 0], np.where(img.min(axis=2) > 100, 255, 0))
    inten = P.run_preprocessor("recolor_intensity", img, threshold_a=1.0)
    assert np.array_equal(inten[:, :, 0], img.max(axis=2))
    gray = np.full((4, 4, 3), 128, np.uint8)  # OpenCV Lab L of sRGB gray 128 is 137 (0..255 scale)
    assert P.run_preprocessor("recolor_luminance", gray, threshold_a=1.0)[0, 0, 0] == 137
    assert P.run_preprocessor("tile_resample", img, threshold_a=2.0).shape == (32, 32, 3)
    s1 = P.run_preprocessor("shuffle", img, 64, seed=3)
    assert np.array_equal(s1, P.run_preprocessor("shuffle", img, 64, seed=3)) and s1.shape == img.shape
    col = P.run_preprocessor("color", img, 128)
    assert col.shape == (128, 128, 3) and len(np.unique(col.reshape(-1, 3), axis=0)) <= 4  # 2x2 colour grid
    assert P.run_preprocessor("scribble_xdog", _square(), 64).max() == 255
    assert P.run_preprocessor("lineart_standard", 255 - _square(), 64).max() > 0


def test_unavailable_and_unknown_modules():
    with pytest.raises(InvalidInputError, match="weights"):
        P.require_preprocessor("openpose")
    with pytest.raises(InvalidInputError, match="unknown ControlNet preprocessor"):
        P.require_preprocessor("nonsense")
    with pytest.raises(InvalidInputError, match="no pixels"):
        P.decode_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="not an image"):
        P.decode_image(base64.b64encode(b"this is text").decode())


def test_resize_modes_and_pixel_perfect():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:] = (0, 0, 255)
    img[-4:] = (0, 160, 0)  # a third colour: a 2-colour map with a dark and a bright channel is "binary" upstream
    just = P.apply_resize_mode(img, 64, 64, ResizeMode.RESIZE)
    assert just.shape == (64, 64, 3) and tuple(just[32, 5]) == (255, 0, 0) and tuple(just[32, 60]) == (0, 0, 255)
    crop = P.apply_resize_mode(img, 64, 64, ResizeMode.INNER_FIT)  # 128x64 scaled, centre 64 columns kept
    assert crop.shape == (64, 64, 3) and tuple(crop[32, 2]) == (255, 0, 0) and tuple(crop[32, 61]) == (0, 0, 255)
    fill = P.apply_resize_mode(img, 64, 64, ResizeMode.OUTER_FIT)  # 64x32 content, bands above and below
    assert fill.shape == (64, 64, 3)
    border = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0).astype(np.uint8)
    assert tuple(fill[2, 10]) == tuple(border) and tuple(fill[32, 2]) == (255, 0, 0)
    assert P.pixel_perfect_resolution(img, 512, 512, ResizeMode.INNER_FIT) == 512
    assert P.pixel_perfect_resolution(img, 512, 512, ResizeMode.OUTER_FIT) == 256


# ------------------------------------------------------------------------------------------- model files

def _tiny_controlnet_sd(context_dim=None):
    from lib_sdtoolkit.controlnet.cldm import ControlNet
    from lib_sdtoolkit.samples import factory

    cfg = factory.get_config("SD1", "tiny")
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    if context_dim:
        kw["context_dim"] = context_dim
    return {"control_model." + k: v.contiguous() for k, v in ControlNet(hint_channels=3, **kw).state_dict().items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from lib_sdtoolkit.files import save_safetensors

    root = tmp_path_factory.mktemp("models")
    (root / "ControlNet").mkdir()
    save_safetensors(root / "ControlNet" / "control_tiny_canny.safetensors", _tiny_controlnet_sd())
    save_safetensors(root / "ControlNet" / "control_other_width.safetensors", _tiny_controlnet_sd(48))
    return root


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_prepare_units_skips_bad_units_with_warnings(models_dir):
    from lib_sdtoolkit.controlnet.models import ControlModelCache
    from lib_sdtoolkit.controlnet.registry import prepare_units
    from lib_sdtoolkit.jobs.controlnet import model_resolver, model_titles
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.samples import factory

    host = StandaloneHost(models_dir=models_dir)
    titles = model_titles(host)
    good = [t for t in titles if t.startswith("control_tiny_canny [")][0]
    other = [t for t in titles if t.startswith("control_other_width")][0]
    img = _png_b64(_square())
    units = [
        {"enabled": True, "module": "canny", "model": good, "image": img, "weight": 0.5},
        {"enabled": True, "module": "depth_zoe", "model": good, "image": img},
        {"enabled": True, "module": "nonsense", "model": good, "image": img},
        {"enabled": True, "module": "canny", "model": "missing_model [0123456789]", "image": img},
        {"enabled": True, "module": "canny", "model": good, "image": base64.b64encode(b"GIF89a-nope").decode()},
        {"enabled": True, "module": "canny", "model": other, "image": img},
        {"enabled": True, "guidance_start": 0.9, "guidance_end": 0.1},
        {"enabled": False, "module": "nonsense"},
    ]
    unet = factory.build_ldm_unet("SD1", "tiny")
    got = prepare_units(units, model_resolver(host), ControlModelCache(2), 64, 64, unet=unet)
    assert len(got.units) == 1 and got.units[0].weight == 0.5
    assert tuple(got.units[0].hint.shape) == (1, 3, 64, 64)
    w = got.warnings
    assert len(w) == 6
    assert "unit 1" in w[0] and "weights" in w[0]
    assert "unit 2" in w[1] and "unknown ControlNet preprocessor" in w[1]
    assert "unit 3" in w[2] and "no such model" in w[2]
    assert "unit 4" in w[3] and "not an image" in w[3]
    assert "unit 5" in w[4] and "text context 48 vs 32" in w[4]
    assert "unit 6" in w[5] and "guidance_start" in w[5]
    assert all("generation continues" in x or "skipped" in x for x in w)


# ------------------------------------------------------------------------------------------------- HTTP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models_dir):
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi import APIRouter, FastAPI

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import SdToolkitRoute
    from lib_sdtoolkit.server.routes_controlnet import register

    app = FastAPI()
    router = APIRouter(route_class=SdToolkitRoute)
    register(router, StandaloneHost(models_dir=models_dir))
    app.include_router(router)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield port
    srv.should_exit = True
    th.join(10)


def test_webuiapi_client_against_routes(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server)
    assert api.controlnet_version() == 3
    models = api.controlnet_model_list()
    assert models[0] == "None" and any(m.startswith("control_tiny_canny [") and m.endswith("]") for m in models)
    modules = api.controlnet_module_list()
    assert "canny" in modules and "none" in modules and "openpose" not in modules
    r = api.controlnet_detect(images=[Image.fromarray(_square())], module="canny", processor_res=64,
                              threshold_a=100, threshold_b=200)
    assert r.info == "Success" and len(r.images) == 1 and set(r.json) == {"info", "images"}
    out = np.asarray(r.image.convert("RGB"))
    assert np.array_equal(out[:, :, 0], P.canny(_square(), 100, 200))


def test_route_shapes_and_errors(server):
    import httpx

    base = f"http://127.0.0.1:{server}"
    d = httpx.get(base + "/controlnet/module_list").json()
    assert set(d) == {"module_list", "module_detail"}
    canny = d["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    assert set(canny["sliders"][0]) == {"name", "value", "min", "max", "step"}
    assert httpx.get(base + "/controlnet/settings").json() == {"control_net_unit_count": 3}
    assert "Canny" in httpx.get(base + "/controlnet/control_types").json()["control_types"]
    img = _png_b64(_square())
    ok = httpx.post(base + "/controlnet/detect", json={"controlnet_module": "invert",
                                                       "controlnet_input_images": [img]})
    assert ok.status_code == 200 and set(ok.json()) == {"info", "images"}
    for body, msg in (({"controlnet_module": "nonsense", "controlnet_input_images": [img]}, "unknown"),
                      ({"controlnet_module": "openpose", "controlnet_input_images": [img]}, "weights"),
                      ({"controlnet_module": "canny", "controlnet_input_images": []}, "No image selected"),
                      ({"controlnet_module": "canny", "controlnet_input_images": ["bm90IGFuIGltYWdl"]},
                       "not an image")):
        r = httpx.post(base + "/controlnet/detect", json=body)
        assert r.status_code == 422 and msg in r.json()["detail"], r.text


def test_routes_not_registered_when_another_controlnet_is_active(models_dir):
    from fastapi import APIRouter

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server.routes_controlnet import register

    host = StandaloneHost(models_dir=models_dir, settings={"sdtoolkit_controlnet_external": "sd-webui-controlnet"})
    router = APIRouter()
    register(router, host)
    assert router.routes == []


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_detect(tmp_path):
    from lib_sdtoolkit.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(_square()).save(src)
    out = tmp_path / "edges.png"
    assert main(["controlnet", "detect", str(src), "--module", "canny", "--res", "64", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(got[:, :, 0], P.canny(_square(), 100, 200))
    assert main(["controlnet", "detect", str(src), "--module", "canny", "-o", str(out)]) == 2  # exists
    assert main(["controlnet", "detect", str(src), "--module", "nonsense", "-o", str(tmp_path / "x.png")]) == 2


# ------------------------------------------------------------------------------- the jobs: one result per face

def _app_client(host):
    from fastapi import APIRouter, FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.server import SdToolkitRoute
    from lib_sdtoolkit.server.routes_controlnet import register

    app = FastAPI()
    router = APIRouter(route_class=SdToolkitRoute)
    register(router, host)
    app.include_router(router)
    return TestClient(app)


def test_detect_cli_api_and_tab_give_the_same_map(models_dir, tmp_path, capsys):
    """controlnet-detect: the CLI's -o PNG, /controlnet/detect's base64 PNG and the tab's map are the same."""
    import gradio as gr

    from lib_sdtoolkit.cli import main
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import controlnet_tab

    host = StandaloneHost(models_dir=models_dir)
    src = tmp_path / "in.png"
    Image.fromarray(_square()).save(src)
    out = tmp_path / "edges.png"
    assert main(["controlnet", "detect", str(src), "-m", "canny", "--res", "64", "--threshold-a", "90", "--b", "180",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()  # a name/value table
    assert printed[0].split() == ["output", str(out)] and printed[2].split() == ["map", "64x64", "px"], printed
    r = _app_client(host).post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [_png_b64(_square())],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 90, "controlnet_threshold_b": 180})
    assert r.status_code == 200 and set(r.json()) == {"info", "images"}, r.text
    with gr.Blocks():
        controlnet_tab.build(host)
    tab_map, msg = controlnet_tab.run_detect(host, {"image": _square(), "module": "canny", "resolution": 64,
                                                    "threshold_a": 90, "threshold_b": 180})
    assert tab_map is not None and msg == "canny: 64x64", msg
    assert out.read_bytes() == base64.b64decode(r.json()["images"][0]) == base64.b64decode(P.encode_png_base64(tab_map))
    assert np.array_equal(tab_map[:, :, 0], P.canny(_square(), 90, 180))   # the independent formula
    _, err = controlnet_tab.run_detect(host, {"image": _square(), "module": "openpose", "resolution": 64,
                                              "threshold_a": -1, "threshold_b": -1})
    assert err.startswith("**Error:**") and "weights" in err


def test_model_list_cli_api_and_tab_agree(models_dir, capsys):
    import json

    from lib_sdtoolkit.cli import main
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import controlnet_tab

    host = StandaloneHost(models_dir=models_dir)
    assert main(["controlnet", "models", "--models-dir", str(models_dir), "--json"]) == 0
    cli_list = json.loads(capsys.readouterr().out)["model_list"]
    api_list = _app_client(host).get("/controlnet/model_list").json()["model_list"]
    tab_list = [line[2:] for line in controlnet_tab.list_models(host).splitlines()]
    assert cli_list == api_list == ["None"] + tab_list
    assert any(t.startswith("control_tiny_canny [") for t in tab_list)
    assert main(["controlnet", "models", "--models-dir", str(models_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == tab_list


def test_detect_keeps_upstreams_body_and_reads_no_path(models_dir, tmp_path):
    """/controlnet/detect keeps sd-webui-controlnet's body: unknown fields are ignored as upstream ignores them (no
    422 there: clients send extra keys such as ``controlnet_masks``/``low_vram``), and the job's CLI-only fields
    (a file to read, an output to write) cannot be reached through it."""
    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.errors import AccessDeniedError
    from lib_sdtoolkit.host import StandaloneHost

    host = StandaloneHost(models_dir=models_dir)
    client = _app_client(host)
    secret = tmp_path / "secret.png"
    Image.fromarray(_square()).save(secret)
    r = client.post("/controlnet/detect", json={"controlnet_module": "invert", "controlnet_input_images": [],
                                                "image": str(secret), "output": str(tmp_path / "o.png"),
                                                "low_vram": True, "controlnet_masks": []})
    assert r.status_code == 422 and "No image selected" in r.json()["detail"]
    assert not (tmp_path / "o.png").exists()
    # the job itself, on a host that is not trusted: a path meets the gate (403); an output must be a plain name
    with pytest.raises(AccessDeniedError):
        jobs.run("controlnet-detect", host, {"image": str(secret), "module": "invert"})
    with pytest.raises(InvalidInputError, match="plain file name"):
        jobs.run("controlnet-detect", host, {"images": [_png_b64(_square())], "module": "invert",
                                             "output": str(tmp_path / "o.png")})
    assert not (tmp_path / "o.png").exists()
