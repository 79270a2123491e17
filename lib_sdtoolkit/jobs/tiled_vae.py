"""Tiled VAE jobs: decode a latent to a PNG, encode an image to a latent file (exact tiled VAE, bounded memory).

The requests are declared here once; ``python -m lib_sdtoolkit vae decode|encode``, ``POST /sdtoolkit/v1/vae/decode``
and ``/vae/encode`` and the Tiled VAE tab are derived from them (:mod:`lib_sdtoolkit.jobs.faces`).

Where the data comes from, per face: the CLI names files (``latent_file`` / ``image``: paths on the user's own
machine, through :class:`~lib_sdtoolkit.host.LocalHost`); the API and the tab send the data itself
(``latent`` as a nested list or ``latent_safetensors_b64``; ``image_b64``). A path field on a host that is not
trusted goes through the same gate as a model name (``host.resolve_input``), so a client can never make a job
read a file outside the model folders. The VAE (a VAE file or a checkpoint with ``first_stage_model.*``) is
resolved through the gate too. On a host that is not trusted the latent / image is bounded (the API's limits)
before any work, and the result comes back as data (a PNG, a latent safetensors); the CLI writes ``-o``.

A latent file holds one tensor ``latent`` [B, 4, h, w] ([B, 16, h, w] for the Flux/SD3 VAE); its metadata
``sdtoolkit.latent_scaled`` says whether it is multiplied by the model's scaling factor (0.18215 SD1/SD2, 0.13025
SDXL, 0.3611 Flux after subtracting the shift 0.1159), ``sdtoolkit.scaling_factor`` which
(``sdtoolkit.shift_factor`` the shift, where there is one).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import AccessDeniedError, FileNotFound, InvalidInputError, SdToolkitError
from ..progress import Progress
from ..validate import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_LATENT_CHANNELS, MAX_LATENT_HW, MAX_LATENT_SIDE
from .base import JobSpec, Report, Request, param

#: tile_size bounds (image pixels); 0 / null = chosen by the planner
MIN_TILE_PX, MAX_TILE_PX = 8, 4096
#: tiles one decode may be cut into on a host that is not trusted (a tiny tile on a large latent = hours of work)
MAX_TILES = 4096
IMAGE_SUFFIXES = (".png",)
LATENT_SUFFIXES = (".safetensors",)
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class _VaeOptions(Request):
    """The fields decode and encode share (the VAE and how to run it)."""

    vae: str = param(help="a VAE file (ldm or diffusers names; 4-channel SD or 16-channel Flux/SD3 ae.safetensors) "
                          "or a checkpoint with first_stage_model.* (or Flux all-in-one vae.*) keys; "
                          "API/UI: a name under the VAE or checkpoint folders", model="vae", metavar="VAE_FILE")
    tile_size: Optional[int] = param(None, help="tile core size in image pixels (8..4096; 0 or unset: from free "
                                                "memory)", minimum=0, maximum=MAX_TILE_PX, metavar="PX")
    full: bool = param(False, help="no tiling: run the VAE as is")
    fast: bool = param(False, help="approximate: estimate GroupNorm statistics from a downscaled pass "
                                   "(no statistics passes)")
    budget_mb: Optional[int] = param(None, help="memory for checkpoints + one tile (default: from free memory)",
                                     minimum=1, api=False)
    device: Optional[str] = param(None, help="cpu, cuda, cuda:N (default: cuda when available)")
    dtype: str = param("fp32", help="the VAE's dtype", choices=DTYPES)
    sdxl: bool = param(False, help="the VAE is SDXL's (scaling factor 0.13025)")
    scaling_factor: Optional[float] = param(None, help="override the latent scaling factor (default: 0.18215 SD1/SD2, "
                                                       "0.13025 SDXL, 0.3611 the 16-channel Flux VAE, 1.5305 SD3's)",
                                            minimum=1e-6)
    shift_factor: Optional[float] = param(None, help="override the latent shift factor of the 16-channel VAE "
                                                     "(default: 0.1159 Flux, 0.0609 SD3; SD VAEs have none)",
                                          minimum=-10.0, maximum=10.0)
    overwrite: bool = param(False, help="replace an existing output", api=False)
    quiet: bool = param(False, help="no progress bar, no plan in the summary", api=False)

    def check(self) -> None:
        if self.full and self.tile_size:
            raise InvalidInputError(f"{self.job}: tile_size and full exclude each other (full = no tiling)")
        if self.tile_size and self.tile_size < MIN_TILE_PX:
            raise InvalidInputError(f"{self.job}: tile_size must be {MIN_TILE_PX}..{MAX_TILE_PX} px (or 0/null for "
                                    f"automatic), got {self.tile_size}")


@dataclass
class VaeDecodeRequest(_VaeOptions):
    """A latent -> one image (the first of the batch)."""

    job = "vae-decode"

    latent_file: Optional[str] = param(None, help="a latent .safetensors file (one tensor 'latent' [B, C, h, w])",
                                       positional=True, metavar="LATENT.safetensors", api=False)
    latent: Optional[List[Any]] = param(None, help="the latent as a nested list [1, C, h, w] (or [C, h, w])",
                                        cli=False)
    latent_safetensors_b64: Optional[str] = param(None, help="a latent .safetensors file, base64", cli=False)
    scaled: bool = param(True, help="'latent' is multiplied by the scaling factor (a latent file's metadata says "
                                    "it itself)", cli=False)
    compare: bool = param(False, help="also run a full decode beside the tiled one when it fits in memory, and "
                                      "compare them", cli=False, api=False)
    output: Optional[str] = param(None, help="the PNG to write", flag="--output", short="-o", api=False)

    def check(self) -> None:
        super().check()
        given = [n for n in ("latent_file", "latent", "latent_safetensors_b64") if getattr(self, n) is not None]
        if not given:
            raise InvalidInputError("vae-decode: give 'latent' or 'latent_safetensors_b64' (CLI: a latent file)")
        if len(given) > 1:
            raise InvalidInputError(f"vae-decode: give one latent, got {', '.join(given)}")


@dataclass
class VaeEncodeRequest(_VaeOptions):
    """An image (sides multiple of 8) -> a latent safetensors file."""

    job = "vae-encode"

    image: Optional[str] = param(None, help="an image file", positional=True, metavar="IMAGE", api=False)
    image_b64: Optional[str] = param(None, help="the image file (PNG, JPEG, WebP ...), base64", cli=False)
    unscaled: bool = param(False, help="store the latent without the scaling factor")
    output: Optional[str] = param(None, help="the latent .safetensors to write", flag="--output", short="-o",
                                  api=False)

    def check(self) -> None:
        super().check()
        given = [n for n in ("image", "image_b64") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidInputError("vae-encode: give one image ('image_b64'; CLI: an image file)")


@dataclass
class VaeDecodeReport(Report):
    """``to_dict`` is the API's answer: ``image`` (base64 PNG; left out when a file was written: ``output``),
    ``plan``, ``width``, ``height``; ``comparison`` when a full decode ran beside it."""

    plan: str
    width: int
    height: int
    output: Optional[str] = None
    comparison: Optional[str] = None
    _png: bytes = b""
    _image: Any = None
    _full_image: Any = None
    _notes: List[str] = field(default_factory=list)
    _seconds: float = 0.0
    _full_seconds: Optional[float] = None
    _quiet: bool = False

    @property
    def image(self) -> Any:
        """The decoded image (PIL, RGB)."""
        return self._image

    @property
    def full_image(self) -> Any:
        """The full decode beside it (``compare``), or None."""
        return self._full_image

    @property
    def png(self) -> bytes:
        """The image as PNG bytes (what ``-o`` holds and the API answers, base64)."""
        return self._png

    def to_dict(self) -> dict:
        d = {"image": base64.b64encode(self._png).decode("ascii")} if self.output is None else {"output": self.output}
        d.update(plan=self.plan, width=self.width, height=self.height)
        if self.comparison is not None:
            d["comparison"] = self.comparison
        return d

    def lines(self) -> List[str]:
        out = [self.plan, f"tiled: {self._seconds:.1f} s" if self.plan != "full decode" else
               f"full: {self._seconds:.1f} s"]
        if self._full_seconds is not None:
            out.append(f"full: {self._full_seconds:.1f} s")
        if self.comparison:
            out.append(self.comparison)
        return out

    def summary(self) -> str:
        last = f"{self.output or 'image'}: {self.width}x{self.height} px"
        return last if self._quiet else "\n".join(self.lines()[:1] + [n for n in self._notes if n != self.plan]
                                                  + [last])


@dataclass
class VaeEncodeReport(Report):
    """``to_dict``: ``latent_safetensors_b64`` (left out when a file was written: ``output``), ``shape``,
    ``scaled``, ``scaling_factor``, ``plan``."""

    shape: List[int]
    scaled: bool
    scaling_factor: float
    plan: str
    output: Optional[str] = None
    _data: bytes = b""
    _quiet: bool = False

    @property
    def data(self) -> bytes:
        """The latent safetensors file's bytes when nothing was written (API, tab)."""
        return self._data

    def to_dict(self) -> dict:
        d = ({"latent_safetensors_b64": base64.b64encode(self._data).decode("ascii")} if self.output is None
             else {"output": self.output})
        d.update(shape=list(self.shape), scaled=self.scaled, scaling_factor=self.scaling_factor, plan=self.plan)
        return d

    def summary(self) -> str:
        how = f"scaled by {self.scaling_factor!r}" if self.scaled else "unscaled"
        last = f"{self.output or 'latent'}: latent {tuple(self.shape)} ({how})"
        return last if self._quiet else f"{self.plan}\n{last}"


# ------------------------------------------------------------------------------------------------ helpers
def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _device(req: _VaeOptions) -> str:
    from ..validate import check_device

    if req.device:
        return check_device(req.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_vae(host: Any, name: str) -> Path:
    """A VAE file or a checkpoint (its ``first_stage_model.*``): looked up in the VAE folders, then the checkpoint
    folders, through the gate (403 outside them, 404 when in neither)."""
    first: Optional[SdToolkitError] = None
    for kind in ("vae", "checkpoint"):
        try:
            return host.resolve_input(name, kind)
        except (FileNotFound, AccessDeniedError) as e:
            first = first or e
    assert first is not None
    raise first


def _input_file(host: Any, name: str) -> Path:
    """A data file (latent, image) a face names: the CLI's own path; elsewhere the gate decides (a client cannot
    name files outside the model folders, and those hold no images)."""
    return host.resolve_input(name, None)


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{what} is not valid base64") from None


def bound_latent(lat: Any) -> Any:
    """A [B, C, h, w] latent within the API's size bounds, finite; returns its first item [1, C, h, w] (one image
    is answered). Whether the VAE takes its channels is :func:`lib_sdtoolkit.tiled_vae.vae.check_latent`."""
    import torch

    if lat.ndim != 4:
        raise InvalidInputError(f"latent must be [1, C, h, w], got shape {tuple(lat.shape)}")
    b, c, h, w = (int(x) for x in lat.shape)
    if min(b, c, h, w) < 1:
        raise InvalidInputError(f"latent has an empty dimension: shape {tuple(lat.shape)}")
    if c > MAX_LATENT_CHANNELS or h > MAX_LATENT_SIDE or w > MAX_LATENT_SIDE or h * w > MAX_LATENT_HW:
        raise InvalidInputError(f"latent {tuple(lat.shape)} is too large (h*w at most {MAX_LATENT_HW}, "
                                f"sides at most {MAX_LATENT_SIDE}, channels at most {MAX_LATENT_CHANNELS})")
    lat = lat[:1].float()
    if not bool(torch.isfinite(lat).all()):
        raise InvalidInputError("latent holds NaN or Inf values")
    return lat


def _check_tiles(req: _VaeOptions, h: int, w: int) -> None:
    """Refuse a tile size that would cut an ``h`` x ``w`` (latent) input into more than MAX_TILES tiles."""
    if req.tile_size and not req.full:
        t = max(1, req.tile_size // 8)
        n = math.ceil(h / t) * math.ceil(w / t)
        if n > MAX_TILES:
            raise InvalidInputError(f"tile_size {req.tile_size} cuts this {w * 8}x{h * 8} image into {n} tiles (at "
                                    f"most {MAX_TILES}); use a larger tile_size or null")


def _config(req: _VaeOptions, progress: Progress, phase: str, notes: List[str]) -> Any:
    from ..tiled_vae import TiledVAEConfig

    return TiledVAEConfig(tile_px=req.tile_size or None, fast=req.fast,
                          budget_bytes=req.budget_mb * 2 ** 20 if req.budget_mb else None,
                          progress=progress.phase(phase), should_stop=lambda: progress.cancelled, log=notes.append)


def _quiet(req: _VaeOptions, progress: Progress) -> Progress:
    """``quiet``: no bar (the face's Stop button still works)."""
    return Progress(cancel_event=progress.cancel_event) if req.quiet else progress


def _load(req: _VaeOptions, vae_path: Path, device: str) -> Any:
    from ..tiled_vae.vae import load_vae

    return load_vae(str(vae_path), device=device, dtype=_torch_dtype(req.dtype), sdxl=True if req.sdxl else None,
                    scaling_factor=req.scaling_factor, shift_factor=req.shift_factor)


def _output(host: Any, req: Any, suffixes: Tuple[str, ...], inputs: List[Optional[Path]]) -> Optional[Path]:
    """Where the result goes: the CLI's ``-o`` (required there); on other faces nothing is written (the result
    comes back as data) unless a face names an output, which then passes the gate."""
    if req.output is None and not host.trusted:
        return None
    from ..files import check_output_path

    kind = "vae"
    out = host.resolve_output(req.output, kind, suffixes=suffixes, plain=not host.trusted)
    return check_output_path(out, [p for p in inputs if p is not None], req.overwrite)


# ------------------------------------------------------------------------------------------------ decode
def _decode_input(host: Any, req: VaeDecodeRequest) -> Tuple[Any, bool, Optional[float], Optional[Path]]:
    from ..tiled_vae.vae import latent_from_list, read_latent, read_latent_bytes

    if req.latent_file is not None:
        src = _input_file(host, req.latent_file)
        lat, scaled, factor = read_latent(str(src))
        return lat, scaled, factor, src
    if req.latent_safetensors_b64 is not None:
        raw = _b64(req.latent_safetensors_b64, "latent_safetensors_b64")
        lat, scaled, factor = read_latent_bytes(raw, "latent_safetensors_b64")
        return lat, scaled, factor, None
    return latent_from_list(req.latent or []), req.scaled, None, None


def run_decode(host: Any, req: VaeDecodeRequest, progress: Progress) -> VaeDecodeReport:
    """Decode the latent (its first image) with the tiled VAE; the CLI writes a PNG, other faces get it back."""
    from .. import tiled_vae
    from ..tiled_vae.vae import check_latent, compare_images, decode, to_pil

    progress = _quiet(req, progress)
    device = _device(req)
    vae_path = resolve_vae(host, req.vae)
    lat, scaled, factor, src = _decode_input(host, req)
    if not host.trusted:
        lat = bound_latent(lat)   # read_latent has already refused a scaling factor that is not a finite number > 0
        _check_tiles(req, int(lat.shape[2]), int(lat.shape[3]))
    out = _output(host, req, IMAGE_SUFFIXES, [src, vae_path])
    vae = _load(req, vae_path, device)
    check_latent(vae, lat, str(src) if src else None)
    if factor and not req.scaling_factor:
        vae.scaling_factor = factor
    notes: List[str] = []
    cfg = _config(req, progress, "tiled decode", notes)
    plan = "full decode" if req.full else tiled_vae.plan_for(vae.decoder, lat.shape, cfg).describe()
    t0 = time.perf_counter()
    img = to_pil(decode(vae, lat, cfg, full=req.full, scaled=scaled))
    report = VaeDecodeReport(plan=plan, width=img.width, height=img.height, _image=img, _notes=notes,
                             _seconds=time.perf_counter() - t0, _quiet=req.quiet)
    if req.compare and not req.full:
        full_plan = tiled_vae.plan_for(vae.decoder, lat.shape,
                                       tiled_vae.TiledVAEConfig(budget_bytes=1 << 50, tile_px=1 << 20))
        need, have = full_plan.peak_estimate * 2, tiled_vae.memory_budget(device)
        if need <= have:
            progress.check()
            t0 = time.perf_counter()
            report._full_image = to_pil(decode(vae, lat, full=True, scaled=scaled))
            report._full_seconds = time.perf_counter() - t0
            report.comparison = compare_images(img, report._full_image)
        else:
            report.comparison = (f"full decode skipped: needs about {need / 2**30:.1f} GiB, "
                                 f"{have / 2**30:.1f} GiB free")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    report._png = buf.getvalue()
    if out is not None:
        from ..files import atomic_path

        with atomic_path(out, overwrite=req.overwrite) as tmp:
            tmp.write_bytes(report._png)
        report.output = str(out) if host.trusted else host.display_name(out, "vae")
    return report


# ------------------------------------------------------------------------------------------------ encode
def _open_image(raw: bytes, what: str, bounded: bool) -> Any:
    """A PIL image from file bytes; ``bounded`` (hosts that are not trusted): its size checked from the header,
    before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw))
        if bounded and (im.width * im.height > MAX_IMAGE_PIXELS or max(im.width, im.height) > MAX_IMAGE_SIDE):
            raise InvalidInputError(f"{what} is too large ({im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} "
                                    f"pixels and {MAX_IMAGE_SIDE} on a side)")
        im.load()
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{what} is too large: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read the image {what} ({type(e).__name__}: {e})") from None
    return im


def _encode_input(host: Any, req: VaeEncodeRequest) -> Tuple[Any, Optional[Path]]:
    """(PIL image, its file or None)."""
    from ..files.regular import open_regular

    if req.image is not None:
        src = _input_file(host, req.image)
        with open_regular(src) as f:
            raw = f.read()
        return _open_image(raw, str(req.image), bounded=not host.trusted), src
    return _open_image(_b64(req.image_b64 or "", "image_b64"), "image_b64", bounded=True), None


def run_encode(host: Any, req: VaeEncodeRequest, progress: Progress) -> VaeEncodeReport:
    """Encode the image with the tiled VAE; the CLI writes ``-o``, other faces get the latent file's bytes."""
    from .. import tiled_vae
    from ..tiled_vae.vae import encode, from_pil, save_latent

    progress = _quiet(req, progress)
    device = _device(req)
    vae_path = resolve_vae(host, req.vae)
    im, src = _encode_input(host, req)
    x = from_pil(im)
    if not host.trusted:
        _check_tiles(req, int(x.shape[2]) // 8, int(x.shape[3]) // 8)
    out = _output(host, req, LATENT_SUFFIXES, [src, vae_path])
    vae = _load(req, vae_path, device)
    notes: List[str] = []
    cfg = _config(req, progress, "tiled encode", notes)
    plan = "full encode" if req.full else tiled_vae.plan_for(vae.encoder, x.shape, cfg).describe()
    lat = encode(vae, x, cfg, full=req.full, scaled=not req.unscaled)
    # the VAE's name, not where the image was (no local path in the file; the same bytes from every face)
    extra = {"sdtoolkit.vae": host.display_name(vae_path)}
    if getattr(vae, "shift_factor", 0.0):
        extra["sdtoolkit.shift_factor"] = repr(float(vae.shift_factor))
    report = VaeEncodeReport(shape=[int(s) for s in lat.shape], scaled=not req.unscaled,
                             scaling_factor=float(vae.scaling_factor), plan=plan, _quiet=req.quiet)
    if out is not None:
        save_latent(str(out), lat, scaled=not req.unscaled, factor=vae.scaling_factor, overwrite=req.overwrite,
                    extra=extra)
        report.output = str(out) if host.trusted else host.display_name(out, "vae")
        return report
    with tempfile.TemporaryDirectory(prefix="sdtoolkit-latent-") as d:
        tmp = Path(d) / "latent.safetensors"
        save_latent(str(tmp), lat, scaled=not req.unscaled, factor=vae.scaling_factor, extra=extra)
        report._data = tmp.read_bytes()
    return report


SPECS = {
    "vae-decode": JobSpec("vae-decode", VaeDecodeRequest, VaeDecodeReport, run_decode,
                          help="latent -> PNG with the exact tiled VAE (bounded memory)",
                          description="Decode a latent (its first image) with the exact tiled VAE: every GroupNorm "
                                      "uses the statistics of the whole image, so the result equals a full decode "
                                      "to float round-off."),
    "vae-encode": JobSpec("vae-encode", VaeEncodeRequest, VaeEncodeReport, run_encode,
                          help="image -> latent file with the exact tiled VAE (bounded memory)",
                          description="Encode an image (sides multiple of 8) to a latent safetensors file (tensor "
                                      "'latent', the posterior's mean, scaled by the model's factor unless "
                                      "--unscaled)."),
}

__all__ = ["VaeDecodeRequest", "VaeEncodeRequest", "VaeDecodeReport", "VaeEncodeReport", "SPECS", "run_decode",
           "run_encode", "resolve_vae", "bound_latent", "MIN_TILE_PX", "MAX_TILE_PX", "MAX_TILES"]
