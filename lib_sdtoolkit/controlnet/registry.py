"""Model names as sd-webui-controlnet shows them, and turning API unit dicts into runnable hook units.

``model_title(path, name)`` titles a ControlNet file as ``"name [hash]"`` (hash = the WebUI's legacy 8-hex model hash:
sha256 of 64 KiB read at offset 1 MiB, cheap even for large files). ``prepare_units`` turns unit dicts into
:class:`~lib_sdtoolkit.controlnet.hook.HookUnit` objects; a unit that cannot run (unknown module or model, bad image,
model for another architecture) is skipped with a warning and the rest go on.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidInputError, SdToolkitError
from ..files.hashes import legacy_model_hash as files_legacy_model_hash
from .unit import ControlNetUnit

log = logging.getLogger(__name__)


def legacy_model_hash(path: os.PathLike) -> str:
    """The WebUI's AutoV1 short hash used in ControlNet model titles (:func:`files.hashes.legacy_model_hash`);
    ``NOFILE`` for anything that is not a readable regular file, as the WebUI writes (a FIFO in the ControlNet
    folder blocked ``/controlnet/model_list`` forever)."""
    try:
        return files_legacy_model_hash(path)
    except SdToolkitError:
        return "NOFILE"


def model_title(path: os.PathLike, name: str) -> str:
    """sd-webui-controlnet's title of a model file: ``name`` (its path under the ControlNet folder) without the
    suffix, and the AutoV1 short hash: ``control_canny [a1b2c3d4]``."""
    return f"{Path(name).with_suffix('').as_posix()} [{legacy_model_hash(path)}]"


@dataclass
class PreparedUnits:
    units: List[Any] = field(default_factory=list)  # HookUnit
    detected_maps: List[Tuple[int, np.ndarray]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def prepare_units(unit_dicts: Sequence[Any], resolve_model: Callable[[str], Path], cache: Any, height: int,
                  width: int,
                  unet: Any = None, init_image: Any = None, dtype: Any = None, device: Any = "cpu",
                  warn: Optional[Callable[[str], None]] = None, seed: Optional[int] = None) -> PreparedUnits:
    """Validate and load every enabled unit. Errors never stop the generation: the unit is skipped and a warning
    naming it and the problem is recorded (and passed to ``warn``). ``resolve_model(title)`` turns a unit's model
    title into its file (the face's gate: :func:`lib_sdtoolkit.jobs.controlnet.model_resolver`). ``seed``: the NumPy
    seed of random preprocessors (shuffle), upstream's ``(p.seed + p.subseed) & 0xFFFFFFFF``
    (:func:`lib_sdtoolkit.controlnet.preprocessors.shuffle_seed`)."""
    import torch

    from .hook import HookUnit
    from .models import check_compatible
    from .preprocessors import COLORFIX_MODULES, apply_resize_mode, decode_image, map_to_hint, \
        pixel_perfect_resolution, require_preprocessor

    out = PreparedUnits()
    for i, raw in enumerate(unit_dicts):
        try:
            unit = ControlNetUnit.from_dict(raw) if not isinstance(raw, ControlNetUnit) else raw.validated()
        except SdToolkitError as e:
            _warn(out, warn, f"ControlNet unit {i}: {e}; unit skipped")
            continue
        if not unit.enabled:
            continue
        for note in unit.adjustments:
            _warn(out, warn, note)
        try:
            pre = require_preprocessor(unit.module)
            has_image = unit.image is not None and not (isinstance(unit.image, str) and not unit.image)
            src = unit.image if has_image else init_image  # (an ndarray from the UI must not meet `in`)
            if src is None:
                raise InvalidInputError("no input image (and no img2img init image)")
            img = decode_image(src, "ControlNet input image")
            res = unit.processor_res
            if unit.pixel_perfect:
                res = pixel_perfect_resolution(img, height, width, unit.resize_mode)
            detected = pre(img, res, unit.threshold_a, unit.threshold_b, seed=seed, pixel_perfect=unit.pixel_perfect)
            fitted = apply_resize_mode(detected, height, width, unit.resize_mode)
            model = cache.get(resolve_model(unit.model), dtype=dtype or torch.float32, device=device)
            if unet is not None:
                check_compatible(model, unet)
        except SdToolkitError as e:
            _warn(out, warn, f"ControlNet unit {i} ({unit.module}, {unit.model}): {e}; generation continues "
                             "without this unit")
            continue
        hu = HookUnit(model, map_to_hint(fitted), unit.weight, unit.control_mode, unit.guidance_start,
                      unit.guidance_end, unit.hr_option, unit.advanced_weighting,
                      name=f"unit {i}: {unit.module} / {unit.model}")
        if pre.name in COLORFIX_MODULES:  # sliders already reset into range by the unit's bound check
            hu.colorfix_variation = int(unit.threshold_a)
            if pre.name.endswith("+sharp"):
                hu.colorfix_sharpness = float(unit.threshold_b)
        out.units.append(hu)
        if unit.save_detected_map:
            out.detected_maps.append((i, fitted))
    return out


def _warn(out: PreparedUnits, warn: Optional[Callable[[str], None]], msg: str) -> None:
    out.warnings.append(msg)
    (warn or log.warning)(msg)


__all__ = ["model_title", "legacy_model_hash", "prepare_units", "PreparedUnits"]
