"""Checks for untrusted input: numbers (finite, in range), device names, path / name text, and the size limits the
HTTP API holds every request to (so one request cannot take the server's memory).

Everything raises ``InvalidInputError`` (422) with a message naming the field and the problem. No torch import at
module level (the CLI's ``--help`` must not import torch); :func:`check_device` imports it when called.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, List, Optional

from .errors import InvalidInputError

#: longest file-name component and whole path the OS accepts (Linux: NAME_MAX 255 bytes, PATH_MAX 4096 with the NUL)
NAME_MAX = 255
PATH_MAX = 4096

#: decoded input image: at most this many pixels (checked from the header, before the pixels are decoded)
MAX_IMAGE_PIXELS = 32 * 1024 * 1024          # e.g. 8192x4096 or 5792x5792
#: longest side of a decoded input image
MAX_IMAGE_SIDE = 16384
#: an image a preprocessor makes (after scaling its short side to the resolution): at most this many pixels
MAX_OUTPUT_PIXELS = 2 * 2048 * 2048          # 2048x4096: resolution 2048 on a 1:2 image (~1.5 GB peak)
#: images in one /controlnet/detect request
MAX_DETECT_IMAGES = 16
#: latent of /vae/decode: h*w at most this (512x512 latent = a 4096x4096 image), channels at most this
MAX_LATENT_HW = 512 * 512
MAX_LATENT_SIDE = 2048
MAX_LATENT_CHANNELS = 64
#: request body of any API route (bytes)
MAX_BODY_BYTES = 64 * 1024 * 1024


def finite(value: Any, name: str, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """``value`` as a float; refuses NaN, +-Inf, non-numbers and values outside [lo, hi]."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo:g}, {hi:g}]" if lo is not None and hi is not None else (f">= {lo:g}" if lo is not None
                                                                             else f"<= {hi:g}")
        raise InvalidInputError(f"{name} must be {rng}, got {v:g}")
    return v


_DEVICE = re.compile(r"^(cpu|cuda|mps)(?::(\d{1,4}))?$")


def available_devices() -> List[str]:
    """The devices this process can use: ``cpu``, ``cuda``/``cuda:N`` when CUDA is available, ``mps`` when it is."""
    import torch

    out = ["cpu"]
    try:
        if torch.cuda.is_available():
            out.append("cuda")
            out.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    except Exception:  # a broken driver counts as no CUDA
        pass
    try:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            out.append("mps")
    except Exception:
        pass
    return out


def check_device(device: Any, name: str = "device") -> str:
    """A device name that exists here (``cpu``, ``cuda``, ``cuda:N``, ``mps``), normalised; else 422 naming the
    devices that do."""
    if not isinstance(device, str):
        raise InvalidInputError(f"{name} must be a string such as 'cpu' or 'cuda', got {device!r}")
    d = device.strip().lower()
    avail = available_devices()
    if not _DEVICE.match(d) or d not in avail:
        shown = device if len(device) <= 40 else device[:40] + "..."
        raise InvalidInputError(f"{name} {shown!r} is not available here (available: {', '.join(avail)})")
    return d


def check_path_text(raw: Any, what: str = "path") -> str:
    """Refuse path / name text the OS cannot take: a NUL byte, text that is not encodable as a file name, a
    component longer than NAME_MAX bytes or a path longer than PATH_MAX bytes. Returns ``raw`` unchanged."""
    text = os.fspath(raw) if raw is not None else ""
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\x00" in text:
        raise InvalidInputError(f"{what} contains a NUL byte")
    try:
        enc = os.fsencode(text)
    except UnicodeError:
        raise InvalidInputError(f"{what} contains characters that cannot be a file name") from None
    if len(enc) >= PATH_MAX:
        raise InvalidInputError(f"{what} is too long ({len(enc)} bytes; a path has at most {PATH_MAX - 1})")
    for part in re.split(rb"[\\/]+", enc):
        if len(part) > NAME_MAX:
            shown = part[:40].decode("utf-8", "replace")
            raise InvalidInputError(f"{what}: the name '{shown}...' is too long ({len(part)} bytes; "
                                    f"a file name has at most {NAME_MAX})")
    return raw


__all__ = ["NAME_MAX", "PATH_MAX", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "MAX_OUTPUT_PIXELS", "MAX_DETECT_IMAGES",
           "MAX_LATENT_HW", "MAX_LATENT_SIDE", "MAX_LATENT_CHANNELS", "MAX_BODY_BYTES", "finite",
           "available_devices", "check_device", "check_path_text"]
