"""The fit of a detected map to the generation size is sd-webui-controlnet's, pixel for pixel (issue 15, items 6/7).

Each reference here is written from upstream's documented steps (its ``detectmap_proc`` / ``high_quality_resize``
and the edge thinning it calls) as plain OpenCV / NumPy calls, never from our code:

* interpolation: a map of 3..199 distinct colours -> INTER_NEAREST; otherwise INTER_AREA when the target has fewer
  pixels, INTER_CUBIC when it has as many or more;
* binary map: exactly 2 colours, overall min < 16 and max > 240. After the resize: mean over the channels as
  float32, clipped, cast to uint8, then Otsu (``cv2.THRESH_BINARY + cv2.THRESH_OTSU``). "One-pixel edges": a 3x3
  erode then dilate (ones kernel) lowers more than half as many values as there are values > 127; then before Otsu
  a non-maximum suppression (a pixel survives where ``cv2.dilate`` with a 3-pixel line kernel - horizontal,
  vertical, two diagonals - equals it) and after Otsu a hit-or-miss thinning: the two thinning kernels in 4
  rotations each (``np.rot90``, all kernels per angle), pixels hit by ``cv2.MORPH_HITMISS`` (> 127) cleared, up to 32
  rounds until nothing changes, then one round of the two pruning kernels in 4 rotations when enlarging;
* a 4th channel (inpaint mask): resized with the same interpolation, then ``(m > 127) * 255``;
* Just Resize: to (W, H). Crop and Resize: k = max(H/h, W/w), size ``int(np.round(w*k))`` x ``int(np.round(h*k))``,
  crop from ``(new - target) // 2``. Resize and Fill: k = min, paste at ``(target - new) // 2`` on a canvas of the
  median of the rows 0 and -1 and the columns 0 and -1 (alpha of that colour 255 with a mask).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_sdtoolkit.controlnet import preprocessors as P
from lib_sdtoolkit.controlnet.modes import ResizeMode

MODES = (ResizeMode.RESIZE, ResizeMode.INNER_FIT, ResizeMode.OUTER_FIT)
#: targets (height, width): shrink, enlarge, the same pixel count turned (INTER_CUBIC), taller
TARGETS = ((64, 96), (320, 448), (173, 131), (200, 96))


# ------------------------------------------------------------------------------------------ reference (from facts)

THIN_RAW = [np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], np.int32),
            np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], np.int32)]
PRUNE_RAW = [np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], np.int32),
             np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], np.int32)]


def _all_rotations(raw):
    out = []
    for angle in (0, 1, 2, 3):
        for k in raw:
            out.append(np.ascontiguousarray(np.rot90(k, k=angle, axes=(0, 1))))
    return out


def _ref_thin(img, prune):
    img = img.copy()

    def one_round(kernels):
        done = True
        for k in kernels:
            hit = np.where(cv2.morphologyEx(img, cv2.MORPH_HITMISS, k) > 127)
            img[hit] = 0
            if hit[0].shape[0] > 0:
                done = False
        return done

    rounds = 0
    while rounds < 32:
        rounds += 1
        if one_round(_all_rotations(THIN_RAW)):
            break
    if prune:
        one_round(_all_rotations(PRUNE_RAW))
    return img


def _ref_nms(g):
    lines = [np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0]] * 3, np.uint8),
             np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8), np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8)]
    out = np.zeros_like(g)
    for k in lines:
        keep = cv2.dilate(g, kernel=k) == g
        out[keep] = g[keep]
    return out


def _ref_resize(x, size):
    """size = (w, h), as cv2 takes it."""
    w, h = size
    mask = None
    if x.shape[2] == 4:
        mask = x[:, :, 3]
        x = x[:, :, :3]
    if x.shape[:2] == (h, w):
        y = x
    else:
        colours = len({tuple(px) for px in x.reshape(-1, 3).tolist()})
        smaller = w * h < x.shape[0] * x.shape[1]
        bigger = w * h > x.shape[0] * x.shape[1]
        binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
        one_px = False
        if binary:
            opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
            one_px = (opened < x).sum() * 2 > (x > 127).sum()
        if 2 < colours < 200:
            interp = cv2.INTER_NEAREST
        elif smaller:
            interp = cv2.INTER_AREA
        else:
            interp = cv2.INTER_CUBIC
        y = cv2.resize(x, (w, h), interpolation=interp)
        if mask is not None:
            mask = cv2.resize(mask, (w, h), interpolation=interp)
        if binary:
            g = np.clip(y.astype(np.float32).mean(axis=2), 0, 255).astype(np.uint8)
            if one_px:
                g = _ref_nms(g)
                _, g = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
                g = _ref_thin(g, prune=bigger)
            else:
                _, g = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
            y = np.dstack([g, g, g])
    if mask is not None:
        m = np.where(mask > 127, 255, 0).astype(np.uint8)
        y = np.dstack([y, m])
    return y


def _ref_fit(x, h, w, mode):
    if mode == ResizeMode.RESIZE:
        return _ref_resize(x, (w, h))
    oh, ow = x.shape[:2]
    if mode == ResizeMode.INNER_FIT:
        k = max(h / oh, w / ow)
        y = _ref_resize(x, (int(np.round(ow * k)), int(np.round(oh * k))))
        top, left = max(0, (y.shape[0] - h) // 2), max(0, (y.shape[1] - w) // 2)
        return y[top:top + h, left:left + w]
    k = min(h / oh, w / ow)
    edge = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
    colour = np.median(edge, axis=0).astype(x.dtype)
    if colour.shape[0] == 4:
        colour[3] = 255
    canvas = np.empty((h, w, x.shape[2]), x.dtype)
    canvas[:, :] = colour
    y = _ref_resize(x, (int(np.round(ow * k)), int(np.round(oh * k))))
    top, left = max(0, (h - y.shape[0]) // 2), max(0, (w - y.shape[1]) // 2)
    canvas[top:top + y.shape[0], left:left + y.shape[1]] = y
    return canvas


# ------------------------------------------------------------------------------------------------------ maps

def _photo(w=173, h=131):
    """Many colours: a smooth gradient with shapes and noise."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 251], axis=2).astype(np.int16)
    base += rng.integers(-9, 10, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _segmentation(w=173, h=131):
    """A few flat colours (what seg / color maps look like): 6 distinct colours."""
    img = Image.new("RGB", (w, h), (120, 120, 70))
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 80, 60], fill=(4, 200, 3))
    d.ellipse([60, 40, 160, 120], fill=(255, 6, 51))
    d.polygon([(0, h - 1), (50, 70), (90, h - 1)], fill=(8, 255, 255))
    d.rectangle([120, 5, 170, 30], fill=(230, 230, 230))
    d.line([0, 0, w, h], fill=(61, 61, 61), width=2)
    return np.asarray(img).copy()


def _blobs(w=173, h=131):
    """Binary with thick regions (a threshold map): 0 / 255, not one-pixel lines."""
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    d.ellipse([20, 15, 110, 100], fill=255)
    d.rectangle([100, 60, 165, 125], fill=255)
    return np.repeat(np.asarray(img)[:, :, None], 3, axis=2).copy()


def _edges(w=173, h=131):
    """Binary one-pixel edges (a canny map of a drawing)."""
    img = Image.new("L", (w, h), 30)
    d = ImageDraw.Draw(img)
    d.ellipse([20, 15, 110, 100], fill=200)
    d.rectangle([100, 60, 165, 125], fill=120)
    d.polygon([(5, 120), (60, 70), (95, 128)], fill=250)
    e = cv2.Canny(np.asarray(img), 50, 100)
    return np.repeat(e[:, :, None], 3, axis=2).copy()


MAPS = {"photo": _photo(), "segmentation": _segmentation(), "blobs": _blobs(), "edges": _edges()}


def test_the_maps_are_of_the_kinds_the_rules_tell_apart():
    """Each map takes the branch it is meant to exercise (else the comparisons below prove less)."""
    def colours(x):
        return np.unique(x.reshape(-1, 3), axis=0).shape[0]

    assert colours(MAPS["photo"]) >= 200
    assert 2 < colours(MAPS["segmentation"]) < 200
    for name in ("blobs", "edges"):
        x = MAPS[name]
        assert colours(x) == 2 and x.min() < 16 and x.max() > 240
    opened = {n: cv2.dilate(cv2.erode(MAPS[n], np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
              for n in ("blobs", "edges")}
    assert (opened["edges"] < MAPS["edges"]).sum() * 2 > (MAPS["edges"] > 127).sum()      # one-pixel edges
    assert not (opened["blobs"] < MAPS["blobs"]).sum() * 2 > (MAPS["blobs"] > 127).sum()  # thick regions


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(MAPS))
def test_fit_is_upstreams(kind, mode, target):
    h, w = target
    src = MAPS[kind]
    got = P.apply_resize_mode(src.copy(), h, w, mode)
    want = _ref_fit(src.copy(), h, w, mode)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{kind} {mode.value} {w}x{h}: {np.count_nonzero(diff)} values differ, max {diff.max()}"
    assert np.array_equal(src, MAPS[kind])  # the input is not changed


def test_binary_maps_stay_binary_and_edges_one_pixel_wide():
    """What the special path is for: an enlarged canny map keeps 0/255 values and lines one pixel wide (no 2x2 block
    of set pixels), where a plain cubic resize would give grey, thick lines."""
    src = MAPS["edges"]
    got = P.apply_resize_mode(src, 393, 519, ResizeMode.RESIZE)[:, :, 0]
    assert set(np.unique(got).tolist()) <= {0, 255}
    on = got > 0
    blocks = on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]
    assert on.sum() > 500 and blocks.sum() == 0
    plain = cv2.resize(src, (519, 393), interpolation=cv2.INTER_CUBIC)
    assert len(np.unique(plain)) > 2


def test_same_size_is_unchanged_and_the_mask_is_thresholded():
    src = MAPS["photo"]
    assert np.array_equal(P.apply_resize_mode(src, src.shape[0], src.shape[1], ResizeMode.RESIZE), src)
    rgba = np.dstack([src, (np.arange(src.shape[1])[None, :] * 2 % 256).repeat(src.shape[0], 0).astype(np.uint8)])
    got = P.apply_resize_mode(rgba, src.shape[0], src.shape[1], ResizeMode.RESIZE, mask_channel=True)
    assert np.array_equal(got[:, :, :3], src)
    assert np.array_equal(got[:, :, 3], np.where(rgba[:, :, 3] > 127, 255, 0).astype(np.uint8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["photo", "segmentation"])
def test_inpaint_mask_channel_follows_upstream(kind, mode):
    src = MAPS[kind]
    yy, xx = np.mgrid[0:src.shape[0], 0:src.shape[1]]
    mask = np.where((xx - 90) ** 2 + (yy - 60) ** 2 < 45 ** 2, 255, 0).astype(np.uint8)
    rgba = np.dstack([src, mask])
    got = P.apply_resize_mode(rgba, 200, 96, mode, mask_channel=True)
    want = _ref_fit(rgba, 200, 96, mode)
    assert got.shape == (200, 96, 4)
    assert np.array_equal(got, want)
    # without the inpaint flag a 4th channel is alpha, composited on white first (upstream's HWC3)
    plain = P.apply_resize_mode(rgba, 200, 96, mode)
    assert plain.shape == (200, 96, 3)
