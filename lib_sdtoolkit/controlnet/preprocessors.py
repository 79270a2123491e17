"""Weight-free ControlNet preprocessors, resize modes and pixel-perfect resolution (OpenCV, as upstream).

The maps are sd-webui-controlnet's, pixel for pixel: users' ControlNet models were trained and tuned on them, so
every step makes the same OpenCV call upstream makes (``cv2.resize`` INTER_AREA / INTER_CUBIC / INTER_NEAREST,
``cv2.Canny``, ``cv2.GaussianBlur`` in 8-bit fixed point or float as upstream feeds it, ``cv2.cvtColor`` to Lab /
HSV, ``cv2.remap``), with the same sizes and roundings, its de-facto quirks included (the uint8 wrap-around in
scribble_xdog, RGB data fed to the BGR conversions) and its seeded shuffle (NumPy's legacy MT19937 stream).
tests/test_controlnet_maps.py checks each module against OpenCV calls written there from upstream's steps.

The slider table :data:`SLIDERS` is upstream's slider data per preprocessor (labels, ranges, defaults, steps):
the panels, ``/controlnet/module_list`` and the unit checks read it.

Preprocessors that need downloaded network weights are listed in :data:`UNAVAILABLE` with the reason; they are never
faked. The fit of a map to the generation size, :func:`apply_resize_mode`, is upstream's too: its three resize modes
and its map-aware resize (INTER_NEAREST for maps of few colours, INTER_AREA / INTER_CUBIC otherwise, binary maps
re-binarised with Otsu and one-pixel edges kept one pixel wide by non-maximum suppression and hit-or-miss thinning,
an inpaint mask in a 4th channel resized alongside and thresholded); tests/test_controlnet_resize_modes.py checks it.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidInputError
from ..validate import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_OUTPUT_PIXELS, finite
from .modes import ResizeMode

Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # keep PIL's decompression-bomb guard


# ------------------------------------------------------------------------------------------------ image helpers

def hwc3(x: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> HxWx3 (alpha composited on white, like upstream's HWC3)."""
    if x.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidInputError(f"image has no pixels (size {x.shape[1]}x{x.shape[0]})")
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def decode_image(data: Any, what: str = "image") -> np.ndarray:
    """PIL image, numpy array, bytes, or a base64 string (raw or ``data:image/...;base64,`` URI) -> HxWx3 uint8.

    Raises ``InvalidInputError`` (422) for anything that is not a decodable image or has zero pixels."""
    if data is None or (isinstance(data, str) and not data.strip()):
        raise InvalidInputError(f"no {what} given")
    if isinstance(data, np.ndarray):
        arr = data
        if arr.ndim >= 2:
            check_image_size(int(arr.shape[1]), int(arr.shape[0]), what)
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = (np.nan_to_num(arr) * 255.0).round()
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return hwc3(arr)
    if isinstance(data, Image.Image):
        return _pil_to_np(data, what)
    if isinstance(data, dict):  # gradio 3 image-with-mask dicts: {"image": ..., "mask": ...}
        return decode_image(data.get("image"), what)
    if isinstance(data, str):
        s = data.strip()
        if s.startswith("data:"):
            s = s.split(",", 1)[1] if "," in s else ""
        try:
            raw = base64.b64decode(s, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{what} is not valid base64") from None
        data = raw
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise InvalidInputError(f"{what} is empty")
        try:
            img = Image.open(io.BytesIO(bytes(data)))
            check_image_size(img.width, img.height, what)  # from the header, before the pixels are decoded
            img.load()
        except Image.DecompressionBombError as e:  # before OSError/ValueError: PIL's bomb guard
            raise InvalidInputError(f"{what} is too large: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise InvalidInputError(f"{what} is not an image ({type(e).__name__}: {e})") from None
        return _pil_to_np(img, what)
    raise InvalidInputError(f"{what} must be an image or base64 string, got {type(data).__name__}")


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse an image with no pixels or more than ``MAX_IMAGE_PIXELS`` / ``MAX_IMAGE_SIDE`` (422)."""
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{what} has no pixels (size {width}x{height})")
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise InvalidInputError(f"{what} is too large ({width}x{height}; at most {MAX_IMAGE_PIXELS} pixels and "
                                f"{MAX_IMAGE_SIDE} on a side)")


def check_output_size(width: int, height: int, what: str = "image", resolution: Optional[float] = None) -> None:
    """Refuse a map a preprocessor would make larger than ``MAX_OUTPUT_PIXELS`` (a thin image scaled up so its
    short side is the resolution: 10000x1 at 2048 would be 20480000x2048)."""
    if width * height > MAX_OUTPUT_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        at = f" at resolution {resolution:g}" if resolution is not None else ""
        raise InvalidInputError(f"{what}{at} would make a {width}x{height} map (at most {MAX_OUTPUT_PIXELS} pixels "
                                f"and {MAX_IMAGE_SIDE} on a side); use a lower resolution or a less elongated image")


def _pil_to_np(img: Image.Image, what: str) -> np.ndarray:
    check_image_size(img.width, img.height, what)
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" else "RGB")
    return hwc3(np.asarray(img, dtype=np.uint8).copy())


def encode_png_base64(img: np.ndarray) -> str:
    """HxWx3 (or HxW) uint8 -> raw base64 PNG (no data-URI header), like the WebUI's encode_pil_to_base64."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pad64(x: int) -> int:
    return int(math.ceil(float(x) / 64.0) * 64 - x)


def _scaled_size(h: int, w: int, k: float, resolution: float) -> Tuple[int, int]:
    if not math.isfinite(k) or k <= 0:
        raise InvalidInputError(f"resolution must be a positive finite number, got {resolution!r}")
    # upstream: int(np.round(float(H) * k)) -- numpy's round half to even, not Python's int(x + 0.5)
    h_t, w_t = int(np.round(float(h) * k)), int(np.round(float(w) * k))
    if h_t < 1 or w_t < 1:
        raise InvalidInputError(f"a {w}x{h} image at resolution {resolution:g} would have no pixels "
                                f"({w_t}x{h_t}); use a higher resolution or a less elongated image")
    check_output_size(w_t + _pad64(w_t), h_t + _pad64(h_t), f"a {w}x{h} image", resolution)
    return h_t, w_t


def resize_image_with_pad(img: np.ndarray, resolution: float) -> Tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """sd-webui-controlnet's resize step: scale by k = resolution / min(H, W) with ``cv2.resize`` (INTER_CUBIC
    when k > 1, INTER_AREA otherwise), sizes ``round(H*k)`` x ``round(W*k)``, then pad right and bottom with edge
    values to a multiple of 64. Returns the padded image and ``remove_pad`` cutting a result back to the scaled
    size."""
    img = hwc3(img)
    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    h_t, w_t = _scaled_size(h_raw, w_raw, k, resolution)
    img = cv2.resize(img, (w_t, h_t), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(img, [[0, _pad64(h_t)], [0, _pad64(w_t)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:h_t, :w_t]).copy()

    return np.ascontiguousarray(padded), remove_pad


# ------------------------------------------------------------------------------------------------- filters

def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(img, (0, 0), sigma)`` (uint8 in OpenCV's 8-bit fixed point, float32 in float)."""
    return cv2.GaussianBlur(img, (0, 0), float(sigma))


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """``cv2.Canny(img, int(low), int(high))``: HxW uint8 edge map (0/255)."""
    return cv2.Canny(np.ascontiguousarray(img), int(low), int(high))


def _noise_disk(h: int, w: int, f: int, rng: np.random.RandomState) -> np.ndarray:
    """Smooth noise in [0, 1], HxW: uniform samples on a coarse (h//f+2)x(w//f+2) grid (the legacy MT19937
    stream ``np.random.uniform`` draws from), enlarged with ``cv2.resize`` INTER_CUBIC, cropped by f on each side
    and min-max normalised (upstream's make_noise_disk)."""
    noise = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f:f + h, f:f + w]
    noise = noise - np.min(noise)
    return noise / np.max(noise)


def shuffle_seed(seed: int, subseed: int) -> int:
    """The NumPy seed sd-webui-controlnet sets before preprocessing: (seed + subseed) & 0xFFFFFFFF (its
    set_numpy_seed; pass the WebUI's p.seed / p.subseed, or all_seeds[0] where they are -1)."""
    return (int(seed) + int(subseed)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------- preprocessors

@dataclass(frozen=True)
class Slider:
    """One slider of a preprocessor, as sd-webui-controlnet declares it (its PreprocessorParameter): the label the
    panel shows, the range a value must lie in, the default (what -1 means) and the step. ``visible=False``: the
    panel hides it; the value still applies (shuffle runs at 512 unless Pixel Perfect says otherwise)."""

    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 0.01
    visible: bool = True

    def api_json(self) -> Dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def gradio_kwargs(self) -> Dict[str, Any]:
        """What the panel's slider takes on a module change: label, range, step, default, visibility."""
        return {"label": self.label, "minimum": self.minimum, "maximum": self.maximum, "step": self.step,
                "value": self.value, "visible": self.visible}


#: the resolution slider every resolution-using preprocessor has upstream (64..2048, default 512, step 8)
RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)

#: (resolution, slider_1, slider_2) per preprocessor: sd-webui-controlnet's own slider data (the classes in
#: scripts/preprocessor/model_free_preprocessors.py and the legacy table; unset steps are its default 0.01).
#: None: the preprocessor has no such slider (the value is not used).
SLIDERS: Dict[str, Tuple[Optional[Slider], Optional[Slider], Optional[Slider]]] = {
    "none": (None, None, None),
    "canny": (RESOLUTION, Slider("Low Threshold", 1, 255, 100, 1), Slider("High Threshold", 1, 255, 200, 1)),
    "invert": (None, None, None),
    "threshold": (RESOLUTION, Slider("Binarization Threshold", 0, 255, 127), None),
    "color": (RESOLUTION, None, None),
    "shuffle": (Slider("Resolution", 64, 2048, 512, 8, visible=False), None, None),
    "blur_gaussian": (RESOLUTION, Slider("Sigma", 0.01, 64.0, 9.0), None),
    "scribble_xdog": (RESOLUTION, Slider("XDoG Threshold", 1, 64, 32), None),
    "tile_resample": (None, Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01), None),
    "tile_colorfix": (None, Slider("Variation", 3.0, 32.0, 8.0, 1.0), None),
    "tile_colorfix+sharp": (None, Slider("Variation", 3.0, 32.0, 8.0, 1.0), Slider("Sharpness", 0.0, 2.0, 1.0, 0.01)),
    "lineart_standard": (RESOLUTION, None, None),
    "recolor_luminance": (None, Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001), None),
    "recolor_intensity": (None, Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001), None),
}

_UNIT_FIELDS = ("processor_res", "threshold_a", "threshold_b")


@dataclass(frozen=True)
class Preprocessor:
    name: str
    fn: Callable[..., np.ndarray]
    label: str = ""
    resolution: Optional[Slider] = RESOLUTION
    slider_1: Optional[Slider] = None
    slider_2: Optional[Slider] = None
    model_free: bool = False
    tags: Tuple[str, ...] = ()
    soft_in_hr_fix: bool = False
    note: str = ""

    def sliders(self) -> List[Dict[str, Any]]:
        return [s.api_json() for s in (self.resolution, self.slider_1, self.slider_2) if s is not None and s.visible]

    def resolve(self, resolution: Optional[float] = -1, slider_1: Optional[float] = -1,
                slider_2: Optional[float] = -1, pixel_perfect: bool = False) -> Tuple[float, float, float, List[str]]:
        """The values to run with and what was changed: -1 (or None) is the slider's default; a value outside the
        slider's range is replaced by the default as sd-webui-controlnet does, and a line says so (its clients
        send fixed values, webuiapi 512/64/64 for every module); the resolution must be a whole number."""
        out: List[float] = []
        notes: List[str] = []
        for v, s, field in ((resolution, self.resolution, _UNIT_FIELDS[0]), (slider_1, self.slider_1, _UNIT_FIELDS[1]),
                            (slider_2, self.slider_2, _UNIT_FIELDS[2])):
            if v is None:
                out.append(float(s.value) if s is not None else -1.0)
                continue
            v = finite(v, field)
            if s is None:
                out.append(v)
                continue
            if v == -1:
                out.append(float(s.value))
                continue
            if s is self.resolution and v != int(v):
                raise InvalidInputError(f"{field} must be a whole number of pixels, got {v:g}")
            if s is self.resolution and pixel_perfect and v >= 1:
                out.append(float(v))
                continue
            if v < s.minimum or v > s.maximum:
                notes.append(f"{field} {v:g} is outside {self.name}'s {s.label} range {s.minimum:g}..{s.maximum:g}: "
                             f"used its default {s.value:g}")
                out.append(float(s.value))
                continue
            out.append(float(v))
        return out[0], out[1], out[2], notes

    def __call__(self, image: Any, resolution: float = -1, slider_1: float = -1, slider_2: float = -1,
                 seed: Optional[int] = None, notes: Optional[List[str]] = None,
                 pixel_perfect: bool = False) -> np.ndarray:
        """The detected map (HxWx3 uint8). ``seed``: the NumPy seed of random preprocessors (shuffle; None: a
        fresh one). ``notes``: a list that gets a line for every slider value that was replaced.
        ``pixel_perfect``: ``resolution`` came from :func:`pixel_perfect_resolution` (used as it is)."""
        res, a, b, changed = self.resolve(resolution, slider_1, slider_2, pixel_perfect=pixel_perfect)
        if notes is not None:
            notes.extend(changed)
        img = decode_image(image)
        out = self.fn(img, res=res, a=a, b=b, seed=seed)
        return hwc3(np.ascontiguousarray(out))


def _p_none(img, **kw):
    return img


def _p_invert(img, **kw):
    return 255 - img


def _p_canny(img, res, a, b, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    return remove_pad(canny(x, int(a), int(b)))


def _p_threshold(img, res, a, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    out = np.zeros_like(x)
    out[np.min(x, axis=2) > a] = 255
    return remove_pad(out)


def _p_color(img, res, **kw):
    # upstream's color annotator: shortest side to res with INTER_AREA (also when enlarging), sizes rounded as
    # round(long/short * res); a (w//64)x(h//64) INTER_CUBIC grid; INTER_NEAREST back to full size
    h, w = img.shape[:2]
    if h < w:
        h_t, w_t = int(res), int(round(w / h * res))
    else:
        h_t, w_t = int(round(h / w * res)), int(res)
    check_output_size(w_t, h_t, f"a {w}x{h} image", res)
    x = cv2.resize(img, (w_t, h_t), interpolation=cv2.INTER_AREA)
    small = cv2.resize(x, (w_t // 64, h_t // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w_t, h_t), interpolation=cv2.INTER_NEAREST)


def _p_shuffle(img, res, seed=None, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    x = remove_pad(x)
    h, w = x.shape[:2]
    rng = np.random.RandomState(None if seed is None else int(seed) & 0xFFFFFFFF)
    f = 256
    fx = _noise_disk(h, w, f, rng) * float(w - 1)
    fy = _noise_disk(h, w, f, rng) * float(h - 1)
    flow = np.stack([fx, fy], axis=2).astype(np.float32)
    return cv2.remap(x, flow, None, cv2.INTER_LINEAR)


def _p_blur(img, res, a, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    return gaussian_blur(remove_pad(x), float(a))


def _p_xdog(img, res, a, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    f = x.astype(np.float32)
    g1 = gaussian_blur(f, 0.5)
    g2 = gaussian_blur(f, 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    # de facto upstream: 2 * (255 - dog) is computed in uint8 and wraps modulo 256 (a dog of 0..127 gives
    # 2..254, 128 gives 254 - 256 + 2 ...): strong edges can fall below the threshold; its maps look like this
    diff = (np.uint8(255) - dog).astype(np.uint8)
    doubled = (diff.astype(np.uint16) * 2 % 256).astype(np.uint8)
    out = np.zeros_like(x)
    out[doubled > a] = 255
    return remove_pad(out)


def _p_tile_resample(img, a, **kw):
    if a < 1.1:
        return img
    h, w = img.shape[:2]
    h_t, w_t = int(float(h) / float(a)), int(float(w) / float(a))
    if h_t < 1 or w_t < 1:
        raise InvalidInputError(f"a {w}x{h} image down-sampled by {a:g} would have no pixels")
    return cv2.resize(img, (w_t, h_t), interpolation=cv2.INTER_AREA)


def _p_lineart_standard(img, res, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    f = x.astype(np.float32)
    g = gaussian_blur(f, 6.0)
    intensity = np.min(g - f, axis=2).clip(0, 255)
    sel = intensity[intensity > 8]
    med = float(np.median(sel)) if sel.size else 0.0  # upstream: max(16, nan) is 16
    intensity /= max(16.0, med)
    intensity *= 127
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))


def _p_recolor_luminance(img, a, **kw):
    # upstream converts the RGB array with COLOR_BGR2LAB (channel 0 weighted as blue): kept, its maps are these
    lum = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)[:, :, 0].astype(np.float32) / 255.0
    return ((lum ** a) * 255.0).clip(0, 255).astype(np.uint8)


def _p_recolor_intensity(img, a, **kw):
    v = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[:, :, 2].astype(np.float32) / 255.0
    return ((v ** a) * 255.0).clip(0, 255).astype(np.uint8)


def _pre(name: str, fn: Callable[..., np.ndarray], label: str = "", **kw: Any) -> Preprocessor:
    res, s1, s2 = SLIDERS[name]
    return Preprocessor(name, fn, label or name, resolution=res, slider_1=s1, slider_2=s2, **kw)


PREPROCESSORS: Dict[str, Preprocessor] = {p.name: p for p in [
    _pre("none", _p_none),
    _pre("canny", _p_canny, tags=("Canny",), soft_in_hr_fix=True),
    _pre("invert", _p_invert, "invert (from white bg & black line)",
         tags=("Canny", "Lineart", "Scribble", "Sketch", "MLSD")),
    _pre("threshold", _p_threshold),
    _pre("color", _p_color, "t2ia_color_grid", tags=("T2I-Adapter",)),
    _pre("shuffle", _p_shuffle, tags=("Shuffle",)),
    _pre("blur_gaussian", _p_blur, tags=("Tile", "Blur")),
    _pre("scribble_xdog", _p_xdog, tags=("Scribble", "Sketch")),
    _pre("tile_resample", _p_tile_resample, tags=("Tile", "Blur")),
    _pre("tile_colorfix", _p_none, tags=("Tile", "Blur"),
         note="the map is the input image (as upstream); the colour fix itself runs during sampling in the "
              "UNet hook (hook.UnetHook.apply_colorfix)"),
    _pre("tile_colorfix+sharp", _p_none, tags=("Tile", "Blur"),
         note="the map is the input image (as upstream); colour fix and sharpening run during sampling"),
    _pre("lineart_standard", _p_lineart_standard, "lineart_standard (from white bg & black line)",
         tags=("Lineart",)),
    _pre("recolor_luminance", _p_recolor_luminance, tags=("Recolor",)),
    _pre("recolor_intensity", _p_recolor_intensity, tags=("Recolor",)),
]}

_W = "needs downloaded network weights ({}), which SD Toolkit does not ship or download"
UNAVAILABLE: Dict[str, str] = {
    **{n: _W.format("MiDaS / LeReS / ZoeDepth / Depth-Anything depth model") for n in
       ("depth", "depth_leres", "depth_leres++", "depth_zoe", "depth_anything", "depth_anything_v2",
        "depth_hand_refiner")},
    **{n: _W.format("normal-estimation model") for n in ("normal_bae", "normal_dsine")},
    **{n: _W.format("OpenPose / DWPose model") for n in
       ("openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dw_openpose_full",
        "animal_openpose", "densepose", "densepose_parula")},
    **{n: _W.format("HED / PiDiNet / TEED edge model") for n in
       ("hed", "hed_safe", "pidinet", "pidinet_safe", "pidinet_sketch", "pidinet_scribble", "scribble_hed",
        "te_hed")},
    "mlsd": _W.format("M-LSD line model"),
    **{n: _W.format("line-art model") for n in ("lineart", "lineart_coarse", "lineart_anime",
                                                 "lineart_anime_denoise")},
    **{n: _W.format("segmentation model") for n in ("segmentation", "oneformer_ade20k", "oneformer_coco",
                                                     "anime_face_segment", "mobile_sam")},
    "mediapipe_face": "needs the mediapipe package and its face-mesh model, not installed",
    **{n: _W.format("CLIP vision encoder") for n in ("clip_vision", "revision_clipvision", "revision_ignore_prompt",
                                                     "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl",
                                                     "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto")},
    **{n: _W.format("insightface model") for n in ("ip-adapter_face_id", "ip-adapter_face_id_plus",
                                                    "instant_id_face_embedding", "instant_id_face_keypoints")},
    "inpaint_only+lama": _W.format("LaMa inpainting model"),
    **{n: "works by patching the UNet's attention during sampling, which SD Toolkit does not implement" for n in
       ("reference_only", "reference_adain", "reference_adain+attn")},
    **{n: "needs mask-aware sampling (inpaint modes), which SD Toolkit does not implement" for n in
       ("inpaint", "inpaint_only")},
}

#: the old names clients still send
ALIASES = {"binary": "threshold", "t2ia_color_grid": "color", "lineart_standard (from white bg & black line)":
           "lineart_standard", "invert (from white bg & black line)": "invert", "blur": "blur_gaussian",
           "tile_gaussian": "blur_gaussian"}


def canonical_name(module: Optional[str]) -> str:
    name = (module or "none").strip()
    if name.lower() == "none":
        return "none"
    return ALIASES.get(name, name)


def get_preprocessor(module: Optional[str]) -> Optional[Preprocessor]:
    return PREPROCESSORS.get(canonical_name(module))


def require_preprocessor(module: Optional[str]) -> Preprocessor:
    """The preprocessor for ``module``; ``InvalidInputError`` (422) naming why when it is unknown or unavailable."""
    name = canonical_name(module)
    pre = PREPROCESSORS.get(name)
    if pre is not None:
        return pre
    if name in UNAVAILABLE:
        raise InvalidInputError(f"ControlNet preprocessor '{name}' is not available: {UNAVAILABLE[name]}")
    raise InvalidInputError(f"unknown ControlNet preprocessor '{module}' (available: {', '.join(PREPROCESSORS)})")


def module_list() -> List[str]:
    return list(PREPROCESSORS)


def module_detail() -> Dict[str, Dict[str, Any]]:
    return {n: {"model_free": p.model_free, "sliders": p.sliders()} for n, p in PREPROCESSORS.items()}


def run_preprocessor(module: Optional[str], image: Any, resolution: float = -1, threshold_a: float = -1,
                     threshold_b: float = -1, seed: Optional[int] = None) -> np.ndarray:
    """Run ``module`` on ``image`` (anything :func:`decode_image` accepts) -> HxWx3 uint8 detected map."""
    return require_preprocessor(module)(image, resolution, threshold_a, threshold_b, seed=seed)


# ------------------------------------------------------------------------------------- resize and pixel perfect

def pixel_perfect_resolution(image: np.ndarray, target_h: int, target_w: int, resize_mode: ResizeMode) -> int:
    """The preprocessor resolution that makes the map land 1:1 on the target (upstream's formula)."""
    raw_h, raw_w = image.shape[:2]
    k0, k1 = float(target_h) / raw_h, float(target_w) / raw_w
    k = min(k0, k1) if resize_mode == ResizeMode.OUTER_FIT else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))


def _rotated(kernels: List[np.ndarray]) -> List[np.ndarray]:
    """Each kernel turned by 0, 90, 180 and 270 degrees (all kernels at one angle, then the next angle)."""
    return [np.ascontiguousarray(np.rot90(k, turn)) for turn in range(4) for k in kernels]


# Hit-or-miss kernels (1: must be set, -1: must be clear, 0: either) of upstream's edge thinning, as data: a set pixel
# matching one of them is cleared. _THIN takes a line down to one pixel without breaking it; _PRUNE then removes
# the one-pixel spurs an enlargement leaves at the ends.
_THIN = _rotated([np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], np.int32),
                  np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], np.int32)])
_PRUNE = _rotated([np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], np.int32),
                   np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], np.int32)])
_MAX_THIN_PASSES = 32
#: 3-pixel lines through the centre: horizontal, vertical and both diagonals (the directions of the edge NMS)
_NMS_LINES = (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
              np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
              np.eye(3, dtype=np.uint8), np.ascontiguousarray(np.fliplr(np.eye(3, dtype=np.uint8))))


def _thin_pass(x: np.ndarray, kernels: List[np.ndarray]) -> bool:
    """Clear (in place) the pixels each kernel matches, kernel after kernel; True when something was cleared."""
    changed = False
    for k in kernels:
        hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, k) > 127
        if hits.any():
            x[hits] = 0
            changed = True
    return changed


def _thin_edges(x: np.ndarray, prune: bool) -> np.ndarray:
    """A binary (0/255) HxW map thinned to one-pixel lines (at most 32 passes), spurs pruned once if ``prune``."""
    for _ in range(_MAX_THIN_PASSES):
        if not _thin_pass(x, _THIN):
            break
    if prune:
        _thin_pass(x, _PRUNE)
    return x


def _edge_nms(x: np.ndarray) -> np.ndarray:
    """Keep a pixel (HxW uint8) where it is the largest of its 3-pixel line in at least one direction, else 0."""
    out = np.zeros_like(x)
    for line in _NMS_LINES:
        np.putmask(out, cv2.dilate(x, kernel=line) == x, x)
    return out


def _otsu(x: np.ndarray) -> np.ndarray:
    return cv2.threshold(x, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def _count_colours(x: np.ndarray) -> int:
    return int(np.unique(x.reshape(-1, x.shape[2]), axis=0).shape[0])


def _map_resize(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """sd-webui-controlnet's resize of a map (HxWx3, or HxWx4 with an inpaint mask last) to ``w`` x ``h``:

    * a map of 3..199 colours (segmentation, colour grids) takes INTER_NEAREST, so no new colour appears;
    * else INTER_AREA when the new size has fewer pixels, INTER_CUBIC otherwise (also for the same pixel count);
    * a binary map (exactly 2 colours, darkest < 16, brightest > 240) is resized that way, averaged over the
      channels (truncated to uint8) and re-binarised with Otsu's threshold; if it is mostly one-pixel lines (more
      than half of its bright values vanish under a 3x3 opening) it first gets non-maximum suppression along four
      directions and after Otsu the hit-or-miss thinning (spurs pruned when enlarging);
    * the mask in a 4th channel is resized with the same interpolation and thresholded (> 127 -> 255, else 0), also
      when no resize is needed.
    """
    mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        x, mask = x[:, :, :3], x[:, :, 3]
    if x.shape[:2] != (h, w):
        new_px, old_px = w * h, x.shape[0] * x.shape[1]
        colours = _count_colours(x)
        binary = colours == 2 and x.min() < 16 and x.max() > 240
        thin_lines = False
        if binary:
            ones = np.ones((3, 3), np.uint8)
            opened = cv2.dilate(cv2.erode(x, ones, iterations=1), ones, iterations=1)
            thin_lines = 2 * int(np.count_nonzero(opened < x)) > int(np.count_nonzero(x > 127))
        if 2 < colours < 200:
            interp = cv2.INTER_NEAREST
        else:
            interp = cv2.INTER_AREA if new_px < old_px else cv2.INTER_CUBIC
        y = cv2.resize(x, (w, h), interpolation=interp)
        if mask is not None:
            mask = cv2.resize(mask, (w, h), interpolation=interp)
        if binary:
            g = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if thin_lines:
                g = _thin_edges(_otsu(_edge_nms(g)), prune=new_px > old_px)
            else:
                g = _otsu(g)
            y = np.stack([g, g, g], axis=2)
    else:
        y = x
    if mask is not None:
        m = ((mask > 127).astype(np.float32) * 255.0).clip(0, 255).astype(np.uint8)
        y = np.concatenate([y, m[:, :, None]], axis=2)
    return y


def _round_size(v: float) -> int:
    """upstream's ``int(np.round(v))`` (half to even); at least 1 pixel (where upstream's cv2.resize would fail)."""
    return max(1, int(np.round(v)))


def apply_resize_mode(detected: np.ndarray, height: int, width: int, mode: ResizeMode,
                      mask_channel: bool = False) -> np.ndarray:
    """Fit a detected map to ``height`` x ``width`` as sd-webui-controlnet does, with :func:`_map_resize`:
    Just Resize stretches; Crop and Resize scales by k = max(height/H, width/W) to ``round(W*k)`` x ``round(H*k)``
    and keeps the centre (offsets ``(new - target) // 2``); Resize and Fill scales by the min and pastes the map at
    ``(target - new) // 2`` on a canvas of the median colour of the map's four border lines (mask channel 255).

    The map is HxWx3 uint8 (greyscale / RGBA are made so by :func:`hwc3`, alpha on white); with ``mask_channel``
    (upstream's inpaint modules) a 4th channel is kept as a mask and any dtype (float32 there) is kept."""
    mode = ResizeMode(mode)
    if mask_channel:
        if detected.ndim != 3 or detected.shape[2] not in (3, 4):
            raise InvalidInputError(f"a map with a mask channel must be HxWx3 or HxWx4, got {tuple(detected.shape)}")
    else:
        detected = hwc3(detected)
    if mode == ResizeMode.RESIZE:
        return np.ascontiguousarray(_map_resize(detected, int(width), int(height)))
    old_h, old_w = detected.shape[:2]
    k0, k1 = float(height) / old_h, float(width) / old_w
    if mode == ResizeMode.OUTER_FIT:
        k = min(k0, k1)
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        colour = np.median(borders, axis=0).astype(detected.dtype)
        if colour.shape[0] == 4:
            colour[3] = 255
        out = np.tile(colour[None, None], [height, width, 1])
        m = _map_resize(detected, _round_size(old_w * k), _round_size(old_h * k))
        nh, nw = m.shape[:2]
        ph, pw = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        m = m[:height, :width]  # never wider than the canvas (upstream: the same pixels, or a shape error)
        out[ph:ph + m.shape[0], pw:pw + m.shape[1]] = m
        return np.ascontiguousarray(out)
    k = max(k0, k1)
    m = _map_resize(detected, _round_size(old_w * k), _round_size(old_h * k))
    nh, nw = m.shape[:2]
    ph, pw = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
    return np.ascontiguousarray(m[ph:ph + height, pw:pw + width])


#: preprocessors whose effect continues during sampling (the hook's tile colour fix)
COLORFIX_MODULES = ("tile_colorfix", "tile_colorfix+sharp")


def map_to_hint(detected: np.ndarray) -> "Any":
    """HxWx3 uint8 -> torch float tensor (1, 3, H, W) in [0, 1] (what ControlNet models take)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(hwc3(detected))).permute(2, 0, 1)[None].float() / 255.0


__all__ = ["Preprocessor", "Slider", "PREPROCESSORS", "UNAVAILABLE", "ALIASES", "get_preprocessor",
           "require_preprocessor", "run_preprocessor", "module_list", "module_detail", "decode_image",
           "encode_png_base64", "hwc3", "canny", "gaussian_blur", "resize_image_with_pad", "apply_resize_mode",
           "pixel_perfect_resolution", "map_to_hint", "canonical_name", "COLORFIX_MODULES", "SLIDERS",
           "RESOLUTION", "shuffle_seed"]
