"""Issue 11, the HTTP API: every route answers bad input with 4xx JSON (never a 500), every input is bounded (image
pixels from the header, preprocessor output size, latent shape, body size, path / name length), devices are checked
against what exists, an unexpected exception is a 500 JSON body with an id, and heavy jobs cannot take every worker
thread. All through FastAPI's TestClient on the standalone app over a private copy of the sample library."""
from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lib_sdtoolkit.errors import SdToolkitError
from lib_sdtoolkit.host import StandaloneHost
from lib_sdtoolkit.server import SdToolkitRoute
from lib_sdtoolkit.server.app import create_app
from lib_sdtoolkit.validate import MAX_IMAGE_PIXELS, check_device, check_path_text

DECODE = "/sdtoolkit/v1/vae/decode"
DETECT = "/controlnet/detect"


@pytest.fixture(scope="module")
def lib(models_dir, tmp_path_factory) -> Path:
    """A private copy of the sample library (routes here may write outputs next to it)."""
    root = tmp_path_factory.mktemp("api_bad") / "models"
    shutil.copytree(models_dir, root)
    return root


@pytest.fixture(scope="module")
def host(lib) -> StandaloneHost:
    return StandaloneHost(models_dir=lib, progress_sink=lambda *a: None)


@pytest.fixture(scope="module")
def client(host) -> TestClient:
    return TestClient(create_app(host, ui=False), raise_server_exceptions=False)


def _post(client: TestClient, url: str, body) -> "object":
    # json.dumps writes NaN / Infinity tokens, which Python's (and starlette's) JSON parser accepts
    return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def _is_4xx_json(r, status=None) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    return detail if isinstance(detail, str) else json.dumps(detail)


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 255).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_header_says(w: int, h: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``w`` x ``h`` (CRC fixed): what a decompression bomb's header looks like."""
    data = bytearray(_png(1, 1, "L"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ---------------------------------------------------------------------------------------------- /controlnet/detect

@pytest.mark.parametrize("field", ["controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_detect_nan_inf_is_422(client, field, value):
    body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(_png(64, 64))], field: value}
    assert "finite" in _is_4xx_json(_post(client, DETECT, body), 422)


def test_detect_out_of_range_still_falls_back_to_the_default(client):
    # upstream's contract (-1 and out-of-range = the slider's default) is kept
    body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(_png(64, 64))],
            "controlnet_processor_res": 99999, "controlnet_threshold_a": -1}
    r = _post(client, DETECT, body)
    assert r.status_code == 200
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert out.size == (512, 512)


def test_detect_thin_image_is_refused_before_the_work(client):
    # the case: a few-KB 10000x1 PNG at processor_res 2048 asked for a 20480000x2048 map (11.7 GB)
    png = _png(10000, 1)
    assert len(png) < 4096
    body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(png)], "controlnet_processor_res": 2048}
    detail = _is_4xx_json(_post(client, DETECT, body), 422)
    assert "20480000x2048" in detail and "resolution" in detail


def test_detect_image_size_is_checked_from_the_header(client):
    # 8000x8000 is under PIL's own bomb guard but over ours: refused from the header, before decoding (the data
    # here is a 1x1 image, so a decoder would fail with "truncated", not "too large")
    body = {"controlnet_module": "invert", "controlnet_input_images": [_b64(_png_header_says(8000, 8000))]}
    assert "too large" in _is_4xx_json(_post(client, DETECT, body), 422)
    # PIL's own guard (2x its limit) is a 422 too
    body["controlnet_input_images"] = [_b64(_png_header_says(30000, 30000))]
    assert "too large" in _is_4xx_json(_post(client, DETECT, body), 422)


def test_detect_real_image_over_the_pixel_limit(client):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 8
    body = {"controlnet_module": "invert", "controlnet_input_images": [_b64(_png(side, side, "L"))]}
    assert "too large" in _is_4xx_json(_post(client, DETECT, body), 422)


@pytest.mark.parametrize("img", ["@@@@", "aGVsbG8=", "é", ""])
def test_detect_bad_images_are_422(client, img):
    body = {"controlnet_module": "canny", "controlnet_input_images": [img]}
    _is_4xx_json(_post(client, DETECT, body), 422)


def test_detect_image_count_is_bounded(client):
    body = {"controlnet_module": "none", "controlnet_input_images": [_b64(_png(8, 8))] * 17}
    assert "at most" in _is_4xx_json(_post(client, DETECT, body), 422)


# ---------------------------------------------------------------------------------------------- /vae/decode

def _latent_b64(t, meta=None) -> str:
    import torch
    from safetensors.torch import save

    return _b64(save({"latent": torch.as_tensor(t).contiguous()}, metadata=meta))


ZERO = np.zeros((1, 4, 4, 4)).tolist()


@pytest.mark.parametrize("body, words", [
    ({"latent_safetensors_b64": "!!!not base64"}, "base64"),
    ({"latent_safetensors_b64": "ñaña"}, "base64"),
    ({"latent_safetensors_b64": "AAAA"}, "latent_safetensors_b64"),
    ({"latent": [[[1, 2], [3]]]}, "rectangular"),
    ({"latent": [[["a", "b"]]]}, "rectangular"),
    ({"latent": [[[{"x": 1}]]]}, "rectangular"),
    ({"latent": [[[[float("nan")] * 4] * 4] * 4]}, "NaN"),
    ({"latent": [[[[1e300] * 4] * 4] * 4]}, "NaN or Inf"),   # overflows float32 to inf
    ({"latent": ZERO, "device": "bogus"}, "not available"),
    ({"latent": ZERO, "device": "cuda:77"}, "not available"),
    ({"latent": ZERO, "device": "mps:0:1"}, "not available"),
    ({"latent": np.zeros((1, 3, 4, 4)).tolist()}, "3 channels"),
    ({"latent": np.zeros((1, 5, 4, 4)).tolist()}, "5 channels"),
    ({"latent": np.zeros((4, 4)).tolist()}, "[1, C, h, w]"),
    ({"latent": [[[[]]]]}, "empty"),
    ({"latent": ZERO, "tile_size": -5}, "tile_size"),
    ({"latent": np.zeros((1, 4, 512, 512)).tolist(), "tile_size": 8}, "tiles"),
    ({"latent": ZERO, "tile_size": 10 ** 9}, "tile_size"),
    ({}, "latent"),
])
def test_vae_decode_bad_input_is_4xx(client, body, words):
    assert words in _is_4xx_json(_post(client, DECODE, {"vae": "vae-tiny", **body}))


def test_vae_decode_bad_latent_files_are_4xx(client):
    import torch

    big = torch.zeros(1, 4, 4096, 1)  # 64 KB of zeros, but a 32768x8 image
    assert "too large" in _is_4xx_json(_post(client, DECODE, {"vae": "vae-tiny",
                                                              "latent_safetensors_b64": _latent_b64(big)}), 422)
    for f in ("abc", "nan", "0"):
        r = _post(client, DECODE, {"vae": "vae-tiny",
                                   "latent_safetensors_b64": _latent_b64(torch.zeros(1, 4, 4, 4),
                                                                         {"sdtoolkit.scaling_factor": f})})
        assert "scaling_factor" in _is_4xx_json(r, 422)


def test_vae_decode_still_works_and_decodes_one_image(client):
    import torch

    r = _post(client, DECODE, {"vae": "vae-tiny", "latent": np.zeros((2, 4, 4, 4)).tolist(), "device": "cpu"})
    assert r.status_code == 200, r.text[:300]
    assert (r.json()["width"], r.json()["height"]) == (32, 32)
    r2 = _post(client, DECODE, {"vae": "vae-tiny", "latent_safetensors_b64": _latent_b64(torch.zeros(1, 4, 4, 4)),
                                "tile_size": 64})
    assert r2.status_code == 200 and r2.json()["image"] == r.json()["image"]


# ---------------------------------------------------------------------------------------------- devices, LoRA

def test_check_device_only_accepts_what_exists():
    import torch

    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    for bad in ("bogus", "cuda:abc", "cpu:0:0", "", "gpu", 3, None, "cuda:99999"):
        with pytest.raises(SdToolkitError, match="device"):
            check_device(bad)
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(SdToolkitError, match="available: cpu"):
            check_device("cuda")


def test_lora_extract_unknown_device_is_422(client, lib):
    body = {"tuned": "sd15-tiny", "base": "sd15-tiny", "output": "ex-dev", "device": "bogus"}
    assert "not available" in _is_4xx_json(_post(client, "/sdtoolkit/v1/lora/extract", body), 422)
    body.update(device="cpu", clamp_quantile=float("nan"))
    msg = _is_4xx_json(_post(client, "/sdtoolkit/v1/lora/extract", body), 422)
    assert "clamp" in msg and "nan" in msg
    assert not list((lib / "Lora").glob("ex-dev*"))


@pytest.mark.parametrize("mult", [float("nan"), float("inf"), 1e9])
def test_lora_bake_bad_multiplier_is_422_and_writes_nothing(client, lib, mult):
    body = {"checkpoint": "sd15-tiny", "loras": [{"lora": "sample-lora-sd15", "multiplier": mult}],
            "output": "baked-bad"}
    assert "multiplier" in _is_4xx_json(_post(client, "/sdtoolkit/v1/lora/bake", body), 422)
    assert not list((lib / "Stable-diffusion").glob("baked-bad*"))


def test_merge_unknown_device_is_422(client):
    body = {"model_a": "sd15-tiny", "model_b": "sd15-tiny", "device": "cuda:42", "output": "m-dev"}
    assert "not available" in _is_4xx_json(_post(client, "/sdtoolkit/v1/merge", body), 422)


# ---------------------------------------------------------------------------------------------- names and paths

LONG = "a" * 256
DEEP = "/".join(["d" * 200] * 21)  # 4220 bytes: over PATH_MAX, every part legal


@pytest.mark.parametrize("method, url, body", [
    ("get", "/sdtoolkit/v1/inspect?path=" + LONG, None),
    ("get", "/sdtoolkit/v1/inspect?path=" + DEEP, None),
    ("get", "/sdtoolkit/v1/inspect?path=%ED%A0%80x", None),  # lone surrogate after decoding
    ("post", "/sdtoolkit/v1/hash", {"paths": [LONG]}),
    ("post", "/sdtoolkit/v1/hash", {"paths": ["/" + DEEP]}),
    ("post", "/sdtoolkit/v1/hash", {"paths": ["\ud800.safetensors"]}),
    ("post", "/sdtoolkit/v1/dedup", {"kind": "vae", "folders": [LONG]}),
    ("post", "/sdtoolkit/v1/prune", {"path": "sd15-tiny", "output": LONG}),
    ("post", "/sdtoolkit/v1/prune", {"path": "sd15-tiny", "output": "x\x00.safetensors"}),
    ("post", "/sdtoolkit/v1/prune", {"path": LONG, "output": "x.safetensors"}),
    ("post", "/sdtoolkit/v1/merge", {"model_a": "sd15-tiny", "model_b": "sd15-tiny", "output": LONG}),
    ("post", "/sdtoolkit/v1/merge", {"model_a": DEEP, "model_b": "sd15-tiny", "output": "m"}),
    ("post", "/sdtoolkit/v1/lora/extract", {"tuned": "sd15-tiny", "base": "sd15-tiny", "output": LONG}),
    ("post", "/sdtoolkit/v1/lora/extract", {"tuned": "sd15-tiny", "base": "sd15-tiny", "output": "a\x00b"}),
    ("post", "/sdtoolkit/v1/lora/bake", {"checkpoint": "sd15-tiny", "loras": [{"lora": LONG}], "output": "b"}),
    ("post", "/sdtoolkit/v1/lora/bake", {"checkpoint": "sd15-tiny", "loras": [{"lora": "sample-lora-sd15"}],
                                         "output": "b\x00"}),
    ("post", DECODE, {"vae": LONG, "latent": ZERO}),
])
def test_long_names_nul_and_bad_text_are_4xx(client, method, url, body):
    r = client.get(url) if method == "get" else _post(client, url, body)
    _is_4xx_json(r)


def test_check_path_text_limits():
    assert check_path_text("a" * 255) == "a" * 255
    assert check_path_text("é" * 127) == "é" * 127          # 254 bytes
    for bad in ("é" * 128, "a" * 256, "x\x00", "\udc80\ud800", "/".join(["a"] * 2100)):
        with pytest.raises(SdToolkitError):
            check_path_text(bad)


# ---------------------------------------------------------------------------------------------- body size, errors

def test_body_over_the_limit_is_413(lib):
    host = StandaloneHost(models_dir=lib, settings={"sdtoolkit_api_max_body_mb": 1 / 1024})  # 1 KiB
    with TestClient(create_app(host, ui=False), raise_server_exceptions=False) as c:
        body = {"controlnet_module": "none", "controlnet_input_images": [_b64(_png(8, 8))] + ["A" * 2048]}
        r = _post(c, DETECT, body)
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        def chunks():  # no Content-Length: counted while it is read
            for _ in range(8):
                yield b" " * 512

        r = c.post("/sdtoolkit/v1/hash", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = _post(c, DETECT, {"controlnet_module": "none", "controlnet_input_images": [_b64(_png(8, 8))]})
        assert r.status_code == 200


def test_unexpected_exception_is_a_json_500_with_an_id(caplog):
    router = APIRouter(route_class=SdToolkitRoute)

    @router.get("/boom")
    def boom() -> dict:
        return {"x": [][1]}

    app = FastAPI()
    app.include_router(router)
    with caplog.at_level(logging.ERROR, logger="lib_sdtoolkit.server"):
        r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    eid = r.json()["error_id"]
    assert len(eid) == 8 and eid in r.json()["detail"] and "IndexError" not in r.text
    rec = [x for x in caplog.records if eid in x.getMessage()]
    assert rec and rec[0].exc_info and rec[0].exc_info[0] is IndexError


# ---------------------------------------------------------------------------------------------- blocking jobs

def test_cheap_routes_answer_while_jobs_hold_their_slots(lib):
    """One heavy job at a time (sdtoolkit_api_max_jobs 1), two worker threads: while a bake is stuck in its
    progress callback and two more bakes wait for the slot, the cheap routes still answer. Without the job slots
    the three bakes would hold both threads and the model list would wait behind them."""
    import anyio.to_thread

    entered, release = threading.Event(), threading.Event()
    inside = {"n": 0, "max": 0}
    lock = threading.Lock()

    def sink(desc, done, total):
        with lock:
            inside["n"] += 1
            inside["max"] = max(inside["max"], inside["n"])
        entered.set()
        try:
            release.wait(60)  # liveness guard only: the test releases it
        finally:
            with lock:
                inside["n"] -= 1
        raise SdToolkitError("stopped by the test")  # interrupts the bake: nothing is written

    host = StandaloneHost(models_dir=lib, settings={"sdtoolkit_api_max_jobs": 1}, progress_sink=sink)
    with TestClient(create_app(host, ui=False), raise_server_exceptions=False) as c:
        async def two_threads():
            anyio.to_thread.current_default_thread_limiter().total_tokens = 2

        c.portal.call(two_threads)
        results = []

        def bake(i):
            results.append(_post(c, "/sdtoolkit/v1/lora/bake", {
                "checkpoint": "sd15-tiny", "loras": [{"lora": "sample-lora-sd15"}], "output": f"slot-{i}"}))

        jobs = [threading.Thread(target=bake, args=(i,)) for i in range(3)]
        for t in jobs:
            t.start()
        try:
            assert entered.wait(120)
            cheap = {}

            def ask():
                cheap["models"] = c.get("/sdtoolkit/v1/models")
                cheap["version"] = c.get("/controlnet/version")

            t = threading.Thread(target=ask)
            t.start()
            t.join(60)
            answered = "version" in cheap and not release.is_set()
        finally:
            release.set()
            for j in jobs:
                j.join(120)
        assert answered, "the cheap routes did not answer while the jobs held the threads"
        assert cheap["models"].status_code == 200 and cheap["version"].status_code == 200
        assert inside["max"] == 1
        assert [r.status_code for r in results] == [400, 400, 400]
        assert all("stopped by the test" in r.json()["detail"] for r in results)
    assert not list((lib / "Stable-diffusion").glob("slot-*"))
