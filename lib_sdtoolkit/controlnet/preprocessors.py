"""Weight-free ControlNet preprocessors, resize modes and pixel-perfect resolution (numpy / torch / PIL; no cv2).

Semantics follow sd-webui-controlnet's model-free preprocessors (module names, slider ranges and defaults, the
resize-with-pad-to-64 step). Where upstream calls OpenCV we re-implement the same algorithm:

* ``canny``: OpenCV ``cv2.Canny(img, low, high)`` with its defaults (3x3 Sobel with replicated border, L1 gradient
  magnitude |gx|+|gy|, per-pixel channel with the largest magnitude on colour input, 4-direction non-maximum
  suppression with the tan(22.5 deg) test and OpenCV's tie rules, integer thresholds, 8-connected hysteresis);
* ``cv2.GaussianBlur(img, (0, 0), sigma)``: kernel size round(sigma*3*2+1)|1 for uint8, round(sigma*4*2+1)|1 for
  float32, BORDER_REFLECT_101;
* ``INTER_AREA`` / ``INTER_CUBIC`` resizes are done with PIL's BOX / BICUBIC filters (not bit-identical to OpenCV).

Preprocessors that need downloaded network weights are listed in :data:`UNAVAILABLE` with the reason; they are never
faked.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

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


def resize_uint8(img: np.ndarray, width: int, height: int, method: str = "auto") -> np.ndarray:
    """Resize HxWxC uint8. ``auto``: BOX (area) when shrinking, BICUBIC when enlarging (upstream's AREA/CUBIC)."""
    width, height = max(1, int(width)), max(1, int(height))
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    if method == "auto":
        method = "area" if width * height < w * h else "cubic"
    flt = {"area": Image.BOX, "cubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}[method]
    if img.ndim == 3 and img.shape[2] == 1:
        return np.asarray(Image.fromarray(img[:, :, 0]).resize((width, height), flt))[:, :, None]
    return np.asarray(Image.fromarray(img).resize((width, height), flt))


def _pad64(x: int) -> int:
    return int(math.ceil(float(x) / 64.0) * 64 - x)


def _scaled_size(h: int, w: int, k: float, resolution: float) -> Tuple[int, int]:
    if not math.isfinite(k) or k <= 0:
        raise InvalidInputError(f"resolution must be a positive finite number, got {resolution!r}")
    h_t, w_t = max(1, int(round(h * k))), max(1, int(round(w * k)))
    check_output_size(w_t + _pad64(w_t), h_t + _pad64(h_t), f"a {w}x{h} image", resolution)
    return h_t, w_t


def resize_image_with_pad(img: np.ndarray, resolution: float) -> Tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale so the short side is ``resolution``, pad right/bottom (edge values) to a multiple of 64; returns the
    padded image and a function cutting a result back to the scaled size (upstream's resize_image_with_pad)."""
    img = hwc3(img)
    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    h_t, w_t = _scaled_size(h_raw, w_raw, k, resolution)
    img = resize_uint8(img, w_t, h_t, "cubic" if k > 1 else "area")
    padded = np.pad(img, [[0, _pad64(h_t)], [0, _pad64(w_t)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:h_t, :w_t])

    return np.ascontiguousarray(padded), remove_pad


# ------------------------------------------------------------------------------------------------- filters

def gaussian_kernel(sigma: float, ksize: int) -> np.ndarray:
    r = ksize // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(img, (0, 0), sigma)`` for uint8 (rounded back to uint8) or float32 HxW(xC) images."""
    if sigma <= 0:
        return img.copy()
    is_u8 = img.dtype == np.uint8
    ksize = int(round(sigma * (3 if is_u8 else 4) * 2 + 1)) | 1
    k = gaussian_kernel(sigma, ksize)
    r = ksize // 2
    x = img.astype(np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    # separable, as shifted-slice sums: memory O(H*W) (torch's CPU float64 conv2d unfolds the image ksize times,
    # 6.5 GB per channel for a 2048x8192 map at sigma 6)
    # BORDER_REFLECT_101 == numpy "reflect"; numpy handles pads longer than the image
    xp = np.pad(x, [[r, r], [r, r], [0, 0]], mode="reflect")
    h, w = x.shape[:2]
    tmp = np.zeros((h + 2 * r, w, x.shape[2]), np.float64)
    for i in range(ksize):
        tmp += k[i] * xp[:, i:i + w]
    del xp
    out = np.zeros((h, w, x.shape[2]), np.float64)
    for i in range(ksize):
        out += k[i] * tmp[i:i + h]
    if squeeze:
        out = out[:, :, 0]
    if is_u8:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV-style Canny edge map (HxW uint8, 0/255) of an HxW or HxWxC uint8 image."""
    if img.ndim == 2:
        img = img[:, :, None]
    low_i, high_i = int(math.floor(low)), int(math.floor(high))
    if low_i > high_i:
        low_i, high_i = high_i, low_i
    x = img.astype(np.int32)
    p = np.pad(x, [[1, 1], [1, 1], [0, 0]], mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    if mag.shape[2] > 1:  # colour: per pixel, the channel with the largest magnitude (first one on ties)
        idx = np.argmax(mag, axis=2)[:, :, None]
        dx = np.take_along_axis(dx, idx, 2)
        dy = np.take_along_axis(dy, idx, 2)
        mag = np.take_along_axis(mag, idx, 2)
    dx, dy, mag = dx[:, :, 0].astype(np.int64), dy[:, :, 0].astype(np.int64), mag[:, :, 0]
    H, W = mag.shape
    m = np.pad(mag, 1, mode="constant")  # outside the image counts as 0
    c = m[1:-1, 1:-1]
    left, right = m[1:-1, :-2], m[1:-1, 2:]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    ul, ur, dl, dr = m[:-2, :-2], m[:-2, 2:], m[2:, :-2], m[2:, 2:]
    xs, ys = np.abs(dx), np.abs(dy) << 15
    tg22x = xs * _TG22
    tg67x = tg22x + (xs << 16)
    horiz = ys < tg22x
    vert = (~horiz) & (ys > tg67x)
    diag = ~(horiz | vert)
    same_sign = (dx ^ dy) >= 0  # s = 1: compare (y-1, x-1) and (y+1, x+1); else (y-1, x+1) and (y+1, x-1)
    keep = np.zeros((H, W), dtype=bool)
    keep |= horiz & (c > left) & (c >= right)
    keep |= vert & (c > up) & (c >= down)
    keep |= diag & same_sign & (c > ul) & (c > dr)
    keep |= diag & ~same_sign & (c > ur) & (c > dl)
    cand = keep & (c > low_i)
    strong = cand & (c > high_i)
    edges = _hysteresis(cand, strong)
    return (edges * 255).astype(np.uint8)


def _hysteresis(cand: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel."""
    if not strong.any():
        return np.zeros_like(cand)
    try:
        from scipy import ndimage

        labels, n = ndimage.label(cand, structure=np.ones((3, 3), dtype=bool))
        good = np.zeros(n + 1, dtype=bool)
        good[np.unique(labels[strong])] = True
        good[0] = False
        return good[labels]
    except ImportError:  # pragma: no cover - scipy ships with the WebUI (scikit-image); plain fallback
        out = strong.copy()
        while True:
            p = np.pad(out, 1)
            grown = np.zeros_like(out)
            for dy in range(3):
                for dx in range(3):
                    grown |= p[dy:dy + out.shape[0], dx:dx + out.shape[1]]
            grown &= cand
            if (grown == out).all():
                return out
            out = grown


def _bilinear_remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """``cv2.remap(img, (map_x, map_y), INTER_LINEAR)`` for in-range coordinates."""
    h, w = img.shape[:2]
    x0 = np.clip(np.floor(map_x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(map_y).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx = (map_x - np.floor(map_x))[..., None]
    fy = (map_y - np.floor(map_y))[..., None]
    f = img.astype(np.float32)
    top = f[y0, x0] * (1 - fx) + f[y0, x1] * fx
    bot = f[y1, x0] * (1 - fx) + f[y1, x1] * fx
    return np.clip(np.floor(top * (1 - fy) + bot * fy + 0.5), 0, 255).astype(np.uint8)


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    import torch

    noise = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2))
    t = torch.from_numpy(noise)[None, None]
    t = torch.nn.functional.interpolate(t, size=(h + 2 * f, w + 2 * f), mode="bicubic", align_corners=False)
    n = t[0, 0].numpy()[f:f + h, f:f + w].copy()
    n -= n.min()
    mx = n.max()
    return n / mx if mx > 0 else n


def _srgb_luminance_lab_l(img: np.ndarray) -> np.ndarray:
    """L of ``cv2.cvtColor(img, COLOR_BGR2LAB)`` for uint8 input (0..255 scale). Upstream feeds RGB data to the
    BGR conversion, so channel 0 is weighted as blue; we keep that to produce the same maps."""
    f = img.astype(np.float64) / 255.0
    lin = np.where(f <= 0.04045, f / 12.92, ((f + 0.055) / 1.055) ** 2.4)
    b, g, r = lin[..., 0], lin[..., 1], lin[..., 2]
    y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    fy = np.where(y > 0.008856, np.cbrt(y), 7.787 * y + 16.0 / 116.0)
    L = np.where(y > 0.008856, 116.0 * fy - 16.0, 903.3 * y)
    return np.clip(np.round(L * 255.0 / 100.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- preprocessors

@dataclass(frozen=True)
class Slider:
    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 1.0

    def api_json(self) -> Dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)


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
        return [s.api_json() for s in (self.resolution, self.slider_1, self.slider_2) if s is not None]

    def __call__(self, image: Any, resolution: float = -1, slider_1: float = -1, slider_2: float = -1,
                 seed: Optional[int] = None) -> np.ndarray:
        res = _in_range(resolution, self.resolution, "processor_res")
        a = _in_range(slider_1, self.slider_1, "threshold_a")
        b = _in_range(slider_2, self.slider_2, "threshold_b")
        img = decode_image(image)
        out = self.fn(img, res=res, a=a, b=b, seed=seed)
        return hwc3(np.ascontiguousarray(out))


def _in_range(v: Optional[float], s: Optional[Slider], name: str = "value") -> float:
    """``v`` when inside the slider's range; the slider's default when out of range or unset (upstream sends -1
    for "default"); NaN / Inf / non-numbers are refused (422)."""
    if v is None:
        return float(s.value) if s is not None else -1.0
    v = finite(v, name)
    if s is None:
        return v
    if v < s.minimum or v > s.maximum:
        return float(s.value)
    return float(v)


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
    h, w = img.shape[:2]
    k = float(res) / float(min(h, w))
    h_t, w_t = _scaled_size(h, w, k, res)
    img = resize_uint8(img, w_t, h_t)
    h, w = img.shape[:2]
    small = resize_uint8(img, max(1, w // 64), max(1, h // 64), "cubic")
    return resize_uint8(small, w, h, "nearest")


def _p_shuffle(img, res, seed=None, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    x = remove_pad(x)
    h, w = x.shape[:2]
    rng = np.random.default_rng(seed)
    f = 256
    mx = _noise_disk(h, w, f, rng) * float(w - 1)
    my = _noise_disk(h, w, f, rng) * float(h - 1)
    return _bilinear_remap(x, mx, my)


def _p_blur(img, res, a, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    return gaussian_blur(remove_pad(x), float(a))


def _p_xdog(img, res, a, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    f = x.astype(np.float32)
    g1 = gaussian_blur(f, 0.5)
    g2 = gaussian_blur(f, 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(x)
    out[2 * (255 - dog.astype(np.int32)) > a] = 255
    return remove_pad(out)


def _p_tile_resample(img, a, **kw):
    if a < 1.1:
        return img
    h, w = img.shape[:2]
    return resize_uint8(img, int(float(w) / a), int(float(h) / a), "area")


def _p_lineart_standard(img, res, **kw):
    x, remove_pad = resize_image_with_pad(img, res)
    f = x.astype(np.float32)
    g = gaussian_blur(f, 6.0)
    intensity = np.min(g - f, axis=2).clip(0, 255)
    sel = intensity[intensity > 8]
    med = float(np.median(sel)) if sel.size else 0.0
    intensity = intensity / max(16.0, med) * 127.0
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))


def _p_recolor_luminance(img, a, **kw):
    lum = _srgb_luminance_lab_l(img).astype(np.float32) / 255.0
    return ((lum ** a) * 255.0).clip(0, 255).astype(np.uint8)


def _p_recolor_intensity(img, a, **kw):
    v = img.max(axis=2).astype(np.float32) / 255.0  # HSV value
    return ((v ** a) * 255.0).clip(0, 255).astype(np.uint8)


_GAMMA = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
_VARIATION = Slider("Variation", 3.0, 32.0, 8.0, 1.0)

PREPROCESSORS: Dict[str, Preprocessor] = {p.name: p for p in [
    Preprocessor("none", _p_none, "none", resolution=None),
    Preprocessor("canny", _p_canny, "canny", slider_1=Slider("Low Threshold", 0, 256, 100),
                 slider_2=Slider("High Threshold", 0, 256, 200), tags=("Canny",), soft_in_hr_fix=True),
    Preprocessor("invert", _p_invert, "invert (from white bg & black line)", resolution=None,
                 tags=("Canny", "Lineart", "Scribble", "Sketch", "MLSD")),
    Preprocessor("threshold", _p_threshold, "threshold", slider_1=Slider("Binarization Threshold", 0, 255, 127)),
    Preprocessor("color", _p_color, "t2ia_color_grid", tags=("T2I-Adapter",)),
    Preprocessor("shuffle", _p_shuffle, "shuffle", tags=("Shuffle",)),
    Preprocessor("blur_gaussian", _p_blur, "blur_gaussian", slider_1=Slider("Sigma", 0.01, 64.0, 9.0, 0.01),
                 tags=("Tile", "Blur")),
    Preprocessor("scribble_xdog", _p_xdog, "scribble_xdog", slider_1=Slider("XDoG Threshold", 1, 64, 32),
                 tags=("Scribble", "Sketch")),
    Preprocessor("tile_resample", _p_tile_resample, "tile_resample", resolution=None,
                 slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01), tags=("Tile", "Blur")),
    Preprocessor("tile_colorfix", _p_none, "tile_colorfix", resolution=None, slider_1=_VARIATION,
                 tags=("Tile", "Blur"),
                 note="the map is the input image (as upstream); the colour fix itself runs during sampling in the "
                      "UNet hook (hook.UnetHook.apply_colorfix)"),
    Preprocessor("tile_colorfix+sharp", _p_none, "tile_colorfix+sharp", resolution=None, slider_1=_VARIATION,
                 slider_2=Slider("Sharpness", 0.0, 2.0, 1.0, 0.01), tags=("Tile", "Blur"),
                 note="the map is the input image (as upstream); colour fix and sharpening run during sampling"),
    Preprocessor("lineart_standard", _p_lineart_standard, "lineart_standard (from white bg & black line)",
                 tags=("Lineart",)),
    Preprocessor("recolor_luminance", _p_recolor_luminance, "recolor_luminance", resolution=None,
                 slider_1=_GAMMA, tags=("Recolor",)),
    Preprocessor("recolor_intensity", _p_recolor_intensity, "recolor_intensity", resolution=None,
                 slider_1=_GAMMA, tags=("Recolor",)),
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


def _is_binary(img: np.ndarray) -> bool:
    return bool(np.isin(img, (0, 255)).all())


def _hq_resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    out = resize_uint8(img, w, h, "area" if w * h < img.shape[0] * img.shape[1] else "lanczos")
    if _is_binary(img):  # keep edge maps binary
        out = np.where(out > 127, 255, 0).astype(np.uint8)
    return out


def apply_resize_mode(detected: np.ndarray, height: int, width: int, mode: ResizeMode) -> np.ndarray:
    """Fit a detected map (HxWx3 uint8) to ``height`` x ``width``: Just Resize stretches, Crop and Resize scales to
    cover and crops the centre, Resize and Fill scales to fit and fills the border with the median border colour."""
    mode = ResizeMode(mode)
    detected = hwc3(detected)
    old_h, old_w = detected.shape[:2]
    if mode == ResizeMode.RESIZE:
        return _hq_resize(detected, width, height)
    k0, k1 = float(height) / old_h, float(width) / old_w
    if mode == ResizeMode.OUTER_FIT:
        k = min(k0, k1)
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        color = np.median(borders, axis=0).astype(np.uint8)
        out = np.tile(color[None, None], [height, width, 1])
        m = _hq_resize(detected, max(1, int(round(old_w * k))), max(1, int(round(old_h * k))))
        nh, nw = m.shape[:2]
        ph, pw = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[ph:ph + nh, pw:pw + nw] = m[:height, :width]
        return out
    k = max(k0, k1)
    m = _hq_resize(detected, max(width, int(round(old_w * k))), max(height, int(round(old_h * k))))
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
           "pixel_perfect_resolution", "map_to_hint", "canonical_name", "COLORFIX_MODULES"]
