"""ControlNet maps pixel-identical to sd-webui-controlnet's (issue 15, item 7).

Users' ControlNet models were trained and tuned on sd-webui-controlnet's maps, so each weight-free preprocessor must
give the same pixels. Each reference below is written here from upstream's documented steps, as plain OpenCV /
NumPy calls (not our code, not upstream's code):

* the resize step: k = resolution / min(H, W); size round(H*k) x round(W*k) with NumPy's rounding; ``cv2.resize``
  with INTER_CUBIC when k > 1, else INTER_AREA; edge padding on the right/bottom to a multiple of 64; the result
  cut back to the scaled size;
* canny: ``cv2.Canny`` on the padded image; threshold: min over channels > A; blur_gaussian: ``cv2.GaussianBlur``
  of the cut uint8 image; scribble_xdog: float32 blurs at sigma 0.5 and 5, ``dog = clip(255 - min(g2 - g1))`` as
  uint8, then ``2 * (255 - dog)`` in uint8 (wrapping modulo 256) > A; lineart_standard: float32 blur at sigma 6,
  ``min(g - x)`` clipped, divided by max(16, median of the values > 8), times 127;
* color: the short side to the resolution with INTER_AREA (long side round(long/short*res)), an INTER_CUBIC grid of
  (w//64)x(h//64), INTER_NEAREST back; tile_resample: INTER_AREA to int(W/rate) x int(H/rate) (nothing below 1.1);
* recolor: channel 0 of ``cv2.cvtColor(img, COLOR_BGR2LAB)`` / channel 2 of COLOR_BGR2HSV, /255, ** gamma, *255;
* shuffle: ``np.random.seed(seed)`` then two noise fields (``np.random.uniform`` on a (h//256+2)x(w//256+2) grid,
  INTER_CUBIC to (w+512)x(h+512), cropped by 256, min-max normalised) scaled by W-1 and H-1, ``cv2.remap`` with
  INTER_LINEAR.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_sdtoolkit.controlnet import preprocessors as P
from lib_sdtoolkit.controlnet.modes import ResizeMode
from lib_sdtoolkit.controlnet.unit import ControlNetUnit
from lib_sdtoolkit.errors import InvalidInputError


def _photo(w: int = 251, h: int = 173, seed: int = 0) -> np.ndarray:
    """A picture with edges, gradients, thin lines and noise (what resizes and filters differ on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=2).astype(np.uint8)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    d.ellipse([w // 5, h // 6, w // 2, h // 2 + 20], fill=(230, 40, 30), outline=(10, 10, 10), width=3)
    d.rectangle([w // 2, h // 3, w - 20, h - 15], fill=(20, 60, 200))
    for i in range(0, w, 17):
        d.line([i, 0, w - i, h], fill=(250, 250, 250), width=1)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


IMG = _photo()
#: resolutions: enlarge (k > 1, INTER_CUBIC), shrink (INTER_AREA), k = 0.75 exactly, odd size
RESOLUTIONS = (512, 128, int(173 * 0.75), 200)


def _ref_scaled(img: np.ndarray, res: int):
    h, w = img.shape[:2]
    k = float(res) / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    mode = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    x = cv2.resize(img, (tw, th), interpolation=mode)
    padded = np.pad(x, ((0, (64 - th % 64) % 64), (0, (64 - tw % 64) % 64), (0, 0)), mode="edge")
    return padded, th, tw


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _ref(module: str, img: np.ndarray, res: int, a: float, b: float = 0, seed: int = 0) -> np.ndarray:
    if module == "canny":
        p, th, tw = _ref_scaled(img, res)
        return _rgb(cv2.Canny(p, int(a), int(b))[:th, :tw])
    if module == "threshold":
        p, th, tw = _ref_scaled(img, res)
        return _rgb(np.where(p.min(axis=2) > a, 255, 0).astype(np.uint8)[:th, :tw])
    if module == "blur_gaussian":
        p, th, tw = _ref_scaled(img, res)
        return cv2.GaussianBlur(np.ascontiguousarray(p[:th, :tw]), (0, 0), float(a))
    if module == "scribble_xdog":
        p, th, tw = _ref_scaled(img, res)
        g1 = cv2.GaussianBlur(p.astype(np.float32), (0, 0), 0.5)
        g2 = cv2.GaussianBlur(p.astype(np.float32), (0, 0), 5.0)
        dog = np.clip(255 - (g2 - g1).min(axis=2), 0, 255).astype(np.uint8)
        doubled = np.uint8(2) * (np.uint8(255) - dog)  # uint8 arithmetic: wraps modulo 256, as upstream's does
        assert doubled.dtype == np.uint8
        return _rgb(np.where(doubled > a, 255, 0).astype(np.uint8)[:th, :tw])
    if module == "lineart_standard":
        p, th, tw = _ref_scaled(img, res)
        x = p.astype(np.float32)
        inten = np.clip((cv2.GaussianBlur(x, (0, 0), 6.0) - x).min(axis=2), 0, 255)
        strong = inten[inten > 8]
        inten = inten / np.float32(max(16.0, float(np.median(strong)) if strong.size else 16.0)) * np.float32(127)
        return _rgb(np.clip(inten, 0, 255).astype(np.uint8)[:th, :tw])
    if module == "color":
        h, w = img.shape[:2]
        th, tw = (res, int(round(w / h * res))) if h < w else (int(round(h / w * res)), res)
        x = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        grid = cv2.resize(x, (tw // 64, th // 64), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(grid, (tw, th), interpolation=cv2.INTER_NEAREST)
    if module == "tile_resample":
        h, w = img.shape[:2]
        return img if a < 1.1 else cv2.resize(img, (int(w / a), int(h / a)), interpolation=cv2.INTER_AREA)
    if module in ("recolor_luminance", "recolor_intensity"):
        code, ch = (cv2.COLOR_BGR2LAB, 0) if module == "recolor_luminance" else (cv2.COLOR_BGR2HSV, 2)
        v = cv2.cvtColor(img, code)[:, :, ch].astype(np.float32) / 255.0
        return _rgb(np.clip((v ** a) * 255.0, 0, 255).astype(np.uint8))
    if module == "shuffle":
        p, th, tw = _ref_scaled(img, res)
        x = np.ascontiguousarray(p[:th, :tw])
        saved = np.random.get_state()
        try:
            np.random.seed(seed)

            def field(scale: float) -> np.ndarray:
                f = 256
                n = np.random.uniform(0, 1, ((th // f) + 2, (tw // f) + 2, 1))
                n = cv2.resize(n, (tw + 2 * f, th + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + th, f:f + tw]
                n = n - n.min()
                return n / n.max() * scale

            fx = field(float(tw - 1))
            fy = field(float(th - 1))
        finally:
            np.random.set_state(saved)
        flow = np.dstack([fx, fy]).astype(np.float32)
        return cv2.remap(x, flow, None, cv2.INTER_LINEAR)
    raise AssertionError(module)


CASES = [("canny", 100, 200), ("canny", 40, 120), ("threshold", 127, 0), ("threshold", 60, 0),
         ("blur_gaussian", 9.0, 0), ("blur_gaussian", 1.5, 0), ("scribble_xdog", 32, 0), ("scribble_xdog", 5, 0),
         ("lineart_standard", -1, -1), ("color", -1, -1)]


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("module,a,b", CASES)
def test_resized_maps_are_upstreams(module, a, b, res):
    got = P.run_preprocessor(module, IMG, res, a, b)
    want = _ref(module, IMG, res, a, b)
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{module} at {res}: {np.count_nonzero(diff)} pixels differ, by up to {diff.max()}"
    assert np.ptp(want) > 0  # the case tests something: the map is not flat


@pytest.mark.parametrize("module,a", [("tile_resample", 1.0), ("tile_resample", 3.3), ("tile_resample", 2.0),
                                      ("recolor_luminance", 1.0), ("recolor_luminance", 0.45),
                                      ("recolor_intensity", 1.0), ("recolor_intensity", 1.7)])
def test_unresized_maps_are_upstreams(module, a):
    got = P.run_preprocessor(module, IMG, -1, a)
    want = _ref(module, IMG, -1, a)
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 12345, 2 ** 32 - 1])
def test_shuffle_is_upstreams_for_the_same_seed(seed):
    got = P.run_preprocessor("shuffle", IMG, 512, seed=seed)
    want = _ref("shuffle", IMG, 512, 0, seed=seed)
    assert got.shape == want.shape == (512, 743, 3)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, P.run_preprocessor("shuffle", IMG, 512, seed=seed + 1 if seed < 2 ** 32 - 1 else 1))
    # the WebUI's seed: (seed + subseed) & 0xFFFFFFFF
    assert P.shuffle_seed(2 ** 32 - 1, 5) == 4 and P.shuffle_seed(7, 8) == 15


def test_grey_and_rgba_inputs_go_through_hwc3_first():
    grey = cv2.cvtColor(IMG, cv2.COLOR_RGB2GRAY)
    assert np.array_equal(P.run_preprocessor("canny", grey, 256, 100, 200),
                          _ref("canny", np.repeat(grey[:, :, None], 3, axis=2), 256, 100, 200))
    rgba = np.dstack([IMG, np.full(IMG.shape[:2], 128, np.uint8)])
    alpha = rgba[:, :, 3:].astype(np.float32) / 255.0  # composited on white in float32 (upstream's HWC3)
    flat = (IMG.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    assert np.array_equal(P.run_preprocessor("threshold", rgba, 300, 150), _ref("threshold", flat, 300, 150))


def test_slider_data_is_upstreams():
    """The labels, ranges and defaults a panel shows and -1 stands for (upstream's preprocessor classes)."""
    s = P.SLIDERS
    assert (s["canny"][1].label, s["canny"][1].minimum, s["canny"][1].maximum, s["canny"][1].value) == \
        ("Low Threshold", 1, 255, 100)
    assert (s["canny"][2].label, s["canny"][2].value) == ("High Threshold", 200)
    assert (s["threshold"][1].label, s["threshold"][1].value) == ("Binarization Threshold", 127)
    assert (s["blur_gaussian"][1].label, s["blur_gaussian"][1].minimum, s["blur_gaussian"][1].maximum,
            s["blur_gaussian"][1].value) == ("Sigma", 0.01, 64.0, 9.0)
    assert (s["scribble_xdog"][1].label, s["scribble_xdog"][1].value) == ("XDoG Threshold", 32)
    assert s["recolor_luminance"][1].label == "Gamma Correction" and s["recolor_luminance"][0] is None
    assert s["tile_colorfix+sharp"][2].label == "Sharpness"
    assert s["shuffle"][0].value == 512 and not s["shuffle"][0].visible
    for name, (res, _, _) in s.items():
        if res is not None:
            assert (res.minimum, res.maximum, res.step) == (64, 2048, 8), name
    assert set(s) == set(P.PREPROCESSORS)
    # -1 means the default: the same map as the default passed explicitly
    assert np.array_equal(P.run_preprocessor("canny", IMG), P.run_preprocessor("canny", IMG, 512, 100, 200))


def test_out_of_range_sliders_are_replaced_and_said_and_bad_values_refused():
    notes = []
    got = P.require_preprocessor("canny")(IMG, 300, 0, 999, notes=notes)
    assert np.array_equal(got, P.run_preprocessor("canny", IMG, 300, 100, 200))
    assert any("threshold_a 0 is outside canny's Low Threshold range 1..255: used its default 100" in n
               for n in notes) and any("threshold_b 999" in n for n in notes)
    with pytest.raises(InvalidInputError, match="whole number"):
        P.run_preprocessor("canny", IMG, 512.5)
    u = ControlNetUnit.from_dict({"enabled": True, "module": "recolor_luminance", "threshold_a": 64,
                                  "processor_res": 512})
    assert u.threshold_a == 1.0 and any("Gamma Correction" in n for n in u.adjustments)
    for bad, match in (({"weight": 2.5}, "weight must be between 0 and 2"),
                       ({"weight": -0.1}, "weight"),
                       ({"guidance_start": -0.5}, "guidance_start must be between 0 and 1"),
                       ({"guidance_end": 1.5}, "guidance_end must be between 0 and 1"),
                       ({"processor_res": 512.5, "module": "canny"}, "processor_res must be a whole number")):
        with pytest.raises(InvalidInputError, match=match):
            ControlNetUnit.from_dict(bad)


def test_pixel_perfect_resolution_is_used_as_computed():
    img = IMG[:40, :60]  # tiny source, large target: upstream's pixel perfect gives 2100, past the slider's 2048
    res = P.pixel_perfect_resolution(img, 2100, 1400, ResizeMode.INNER_FIT)
    assert res == int(np.round(max(2100 / 40, 1400 / 60) * 40)) == 2100
    got = P.require_preprocessor("threshold")(img, res, 100, pixel_perfect=True)
    assert np.array_equal(got, _ref("threshold", img, res, 100))


# ------------------------------------------------------------------------------------------------- the panel

def test_panel_sliders_follow_the_module_and_pixel_perfect(tmp_path):
    """The standalone tab: each module's own labels/ranges/defaults (not 'Threshold A/B' on 0..256 for all, not a
    64-clamped '-1'), Pixel Perfect with a target size giving upstream's resolution."""
    import gradio as gr

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import controlnet_tab as T

    res, a, b = T.slider_kwargs("canny")
    assert (res["label"], res["minimum"], res["maximum"], res["value"], res["visible"]) == \
        ("Resolution", 64, 2048, 512, True)
    assert (a["label"], a["minimum"], a["maximum"], a["value"]) == ("Low Threshold", 1, 255, 100)
    assert (b["label"], b["value"]) == ("High Threshold", 200)
    res, a, b = T.slider_kwargs("recolor_luminance")
    assert res == {"visible": False} and a["label"] == "Gamma Correction" and b == {"visible": False}
    assert T.slider_kwargs("canny", pixel_perfect=True)[0]["visible"] is False
    assert [u["visible"] for u in T.slider_updates("none")] == [False, False, False]

    host = StandaloneHost(models_dir=tmp_path)
    with gr.Blocks() as demo:
        T.build(host)
    comps = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    assert comps["sdtoolkit_cn_a"].label == "Low Threshold" and comps["sdtoolkit_cn_a"].maximum == 255
    assert comps["sdtoolkit_cn_res"].value == 512 and "sdtoolkit_cn_pixel_perfect" in comps

    img = IMG[:60, :90]
    vals = {"image": img, "module": "threshold", "resolution": 512, "threshold_a": 127, "threshold_b": 0,
            "pixel_perfect": True, "width": 800, "height": 600, "resize_mode": "Crop and Resize"}
    got, msg = T.run_detect(host, vals)  # 60x90 -> 600x800 covering: k = max(600/60, 800/90) = 10
    want_res = P.pixel_perfect_resolution(img, 600, 800, ResizeMode.INNER_FIT)
    assert want_res == 600 and f"pixel perfect: resolution {want_res} for 800x600" in msg
    assert np.array_equal(got, _ref("threshold", img, want_res, 127))
    got, msg = T.run_detect(host, dict(vals, resize_mode="Resize and Fill", width=512, height=512))
    fill_res = P.pixel_perfect_resolution(img, 512, 512, ResizeMode.OUTER_FIT)  # k = min(512/60, 512/90)
    assert fill_res == int(np.round(512 / 90 * 60)) == 341
    assert np.array_equal(got, _ref("threshold", img, fill_res, 127))
    # -1 is the module's default, not the slider's minimum
    got, _ = T.run_detect(host, dict(vals, pixel_perfect=False, resolution=-1))
    assert got.shape[:2] == (512, 768)
