"""ControlNet jobs: run a preprocessor on images (detect), list the ControlNet models with their WebUI titles.

``python -m lib_sdtoolkit controlnet detect|models``, the ControlNet tab and the sd-webui-controlnet routes
(``POST /controlnet/detect``, ``GET /controlnet/model_list``) run these. The routes keep sd-webui-controlnet's body
and answer shapes (its field names ``controlnet_module``, ``controlnet_input_images``, ...; unknown fields ignored,
as upstream does): :mod:`lib_sdtoolkit.server.routes_controlnet` translates its body into :class:`DetectRequest`.

Where the images come from, per face: the CLI names a file (``image``: a path on the user's own machine, through
:class:`~lib_sdtoolkit.host.LocalHost`); the API and the tab send the images themselves (``images``: base64
strings, or arrays / PIL images from the tab). A path on a host that is not trusted goes through the gate
(``host.resolve_input``), which only ever hands out model files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from ..errors import InvalidInputError
from ..progress import Progress
from ..validate import MAX_DETECT_IMAGES
from .base import JobSpec, Report, Request, param


@dataclass
class DetectRequest(Request):
    """A preprocessor run on one or more images (the sliders as sd-webui-controlnet's: -1 = the module's default;
    a value outside the slider's range falls back to the default too, and the report's note says so)."""

    job = "controlnet-detect"

    image: Optional[str] = param(None, help="an image file", positional=True, metavar="IMAGE", api=False)
    images: List[Any] = param(default_factory=list, help="images: base64 (raw or a data: URI)", cli=False)
    module: str = param("canny", help="the preprocessor (`controlnet modules` lists them)", flag="--module",
                        short="-m")
    resolution: int = param(-1, help="processor resolution in pixels: the short side the image is scaled to "
                                     "before detection (-1: the module's default, 512; range 64..2048)",
                            flag="--res", metavar="PX")
    threshold_a: float = param(-1.0, help="the module's first slider, e.g. canny's Low Threshold (-1: its default; "
                                          "`controlnet modules` lists each module's sliders and ranges)",
                               flag="--a", short="--threshold-a", metavar="A")
    threshold_b: float = param(-1.0, help="the module's second slider, e.g. canny's High Threshold (-1: its "
                                          "default)", flag="--b", short="--threshold-b", metavar="B")
    seed: Optional[int] = param(None, help="NumPy seed of random preprocessors (shuffle); the WebUI uses "
                                           "(seed + subseed) & 0xFFFFFFFF of the generation; default: a fresh one")
    pixel_perfect: bool = param(False, help="compute the resolution from the target size (--width/--height) and "
                                            "--resize-mode so the map lands 1:1 on the generation, as "
                                            "sd-webui-controlnet's Pixel Perfect")
    width: int = param(512, help="target width of the generation (with --pixel-perfect)", minimum=64,
                       maximum=16384, metavar="PX")
    height: int = param(512, help="target height of the generation (with --pixel-perfect)", minimum=64,
                        maximum=16384, metavar="PX")
    resize_mode: str = param("Crop and Resize", help="how the map is fitted to the target (with --pixel-perfect): "
                                                     "Resize and Fill uses the smaller scale, the others the larger",
                             choices=("Just Resize", "Crop and Resize", "Resize and Fill"))
    output: Optional[str] = param(None, help="the detected map to write (PNG unless the suffix names another "
                                             "image format)", flag="--output", short="-o", api=False)
    overwrite: bool = param(False, help="replace an existing output", api=False)


@dataclass
class DetectReport(Report):
    """``to_dict`` is sd-webui-controlnet's answer ``{"info": "Success", "images": [base64 PNG, ...]}`` (with
    ``output`` instead of ``images`` when the map was written to a file)."""

    module: str
    width: int
    height: int
    note: str = ""
    output: Optional[str] = None
    _maps: List[Any] = field(default_factory=list)

    def to_dict(self) -> dict:
        from ..controlnet.preprocessors import encode_png_base64

        extra = {"note": self.note} if self.note else {}  # e.g. a slider value replaced by its default
        if self.output is not None:
            return {"info": "Success", "output": self.output, "module": self.module, "width": self.width,
                    "height": self.height, **extra}
        return {"info": "Success", "images": [encode_png_base64(m) for m in self._maps], **extra}

    @property
    def maps(self) -> List[Any]:
        """The detected maps (HxWx3 uint8 arrays), one per input image."""
        return self._maps

    def summary(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if self.output is not None:
            return f"{self.output}: {self.width}x{self.height} ({self.module}){note}"
        return f"{self.module}: {self.width}x{self.height}{note}"


def _sources(req: DetectRequest, src: Optional[Path]) -> List[tuple]:
    """(data, what) for every input image (``src``: the image file, resolved through the gate)."""
    from ..files.regular import open_regular

    out: List[tuple] = []
    if src is not None:
        with open_regular(src) as f:
            out.append((f.read(), str(req.image)))
    out += [(x, f"controlnet_input_images[{i}]") for i, x in enumerate(req.images or [])]
    return out


def _output(host: Any, req: DetectRequest, sources: List[tuple], src: Optional[Path]) -> Optional[Path]:
    if req.output is None and not host.trusted:
        return None
    from ..files import check_output_path

    if len(sources) != 1:
        raise InvalidInputError("controlnet-detect: an output file takes exactly one image")
    out = host.resolve_output(req.output, "controlnet", suffixes=() if host.trusted else (".png",),
                              plain=not host.trusted)
    return check_output_path(out, [src] if src is not None else [], req.overwrite)


def run_detect(host: Any, req: DetectRequest, progress: Progress) -> DetectReport:
    """Run the preprocessor on each image; the CLI writes the map to ``-o``, other faces get the maps back."""
    import io

    from PIL import Image

    from ..controlnet import preprocessors as P

    pre = P.require_preprocessor(req.module)  # 422: unknown / unavailable (before the images, as upstream)
    src = host.resolve_input(req.image, None) if req.image is not None else None
    sources = _sources(req, src)
    if not sources:
        raise InvalidInputError("No image selected")
    if len(sources) > MAX_DETECT_IMAGES:
        raise InvalidInputError(f"at most {MAX_DETECT_IMAGES} images per request, got {len(sources)}")
    out = _output(host, req, sources, src)
    maps = []
    notes: List[str] = []
    for i, (data, what) in enumerate(sources):
        progress("detecting", i, len(sources), what)
        img = P.decode_image(data, what=what)
        res = req.resolution
        if req.pixel_perfect and pre.resolution is not None:
            from ..controlnet.modes import ResizeMode

            res = P.pixel_perfect_resolution(img, req.height, req.width, ResizeMode(req.resize_mode))
            notes.append(f"pixel perfect: resolution {res} for {req.width}x{req.height} ({req.resize_mode})")
        maps.append(pre(img, res, req.threshold_a, req.threshold_b, seed=req.seed, notes=notes,
                        pixel_perfect=req.pixel_perfect))
    progress("detecting", len(sources), len(sources))
    h, w = maps[0].shape[:2]
    note = "; ".join(dict.fromkeys([pre.note] + notes if pre.note else notes))
    report = DetectReport(module=pre.name, width=int(w), height=int(h), note=note, _maps=maps)
    if out is not None:
        from ..files import atomic_path

        buf = io.BytesIO()
        fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
        Image.fromarray(maps[0]).save(buf, format=fmt)
        with atomic_path(out, overwrite=req.overwrite) as tmp:
            tmp.write_bytes(buf.getvalue())
        report.output = str(out) if host.trusted else host.display_name(out, "controlnet")
    return report


@dataclass
class ModelsRequest(Request):
    """The ControlNet models as sd-webui-controlnet titles them (``name [short hash]``)."""

    job = "controlnet-models"

    update: bool = param(True, help="re-scan the host's model lists first", negate="--no-update")


@dataclass
class ModelsReport(Report):
    """``to_dict``: sd-webui-controlnet's ``{"model_list": ["None", "name [hash]", ...]}``."""

    model_list: List[str]

    def summary(self) -> str:
        return "\n".join(self.model_list[1:]) or "(no ControlNet models found)"


def model_titles(host: Any) -> List[str]:
    """Every ControlNet model of the host, titled ``name [hash]`` (the one folder walker: ``host.list_models``)."""
    from ..controlnet.registry import model_title

    return [model_title(p, host.display_name(p, "controlnet")) for p in host.list_models("controlnet")]


def resolve_model(host: Any, title: str) -> Path:
    """A model title (``name [hash]``), a name or a relative path -> file under the ControlNet folders (the gate:
    ``host.resolve_input``; 403 outside them, 404 when missing)."""
    from ..errors import InvalidInputError

    if not title or title.strip().lower() == "none":
        raise InvalidInputError("no ControlNet model selected")
    return host.resolve_input(title.strip(), "controlnet")


def model_resolver(host: Any) -> Callable[[str], Path]:
    """``resolve(title)`` for :func:`lib_sdtoolkit.controlnet.registry.prepare_units`, bound to ``host``."""
    return lambda title: resolve_model(host, title)


def run_models(host: Any, req: ModelsRequest, progress: Progress) -> ModelsReport:
    if req.update:
        host.refresh("controlnet")
    return ModelsReport(model_list=["None"] + model_titles(host))


SPECS = {
    "controlnet-detect": JobSpec("controlnet-detect", DetectRequest, DetectReport, run_detect,
                                 help="run a preprocessor on an image and write the detected map"),
    "controlnet-models": JobSpec("controlnet-models", ModelsRequest, ModelsReport, run_models,
                                 help="list the ControlNet models (sd-webui-controlnet titles: name [hash])"),
}

__all__ = ["DetectRequest", "DetectReport", "ModelsRequest", "ModelsReport", "SPECS", "run_detect", "run_models",
           "model_titles", "resolve_model", "model_resolver"]
