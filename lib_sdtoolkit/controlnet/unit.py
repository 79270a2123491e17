"""ControlNet units: the fields, defaults and validation of sd-webui-controlnet's ``ControlNetUnit``.

A unit arrives as a dict from the API (``alwayson_scripts.controlnet.args[i]``), from the WebUI panels or from a
client such as ``webuiapi``. :meth:`ControlNetUnit.from_dict` accepts the display strings of the enums, their legacy
aliases and the legacy integer indexes, the deprecated field aliases (``guidance`` -> ``guidance_end``, ``lowvram`` ->
``low_vram``, ``input_image`` -> ``image``, ``mask_image`` -> ``mask``), and checks the ranges upstream's pydantic
model declares: weight 0..2, guidance_start / guidance_end 0..1 with start <= end, a whole-number processor_res (a
clear 422 otherwise, never a silent change). ``processor_res`` / ``threshold_a`` / ``threshold_b`` of -1 mean the
preprocessor's slider default; another value outside the slider's range is replaced by that default as upstream
does (clients such as webuiapi send 512/64/64 for every module), and :attr:`ControlNetUnit.adjustments` says so
(the generation's comments and the log show it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..errors import InvalidInputError


from .modes import ControlMode, HiResFixOption, ResizeMode  # re-exported: callers import them from here


_RESIZE_ALIASES = {
    "just resize": ResizeMode.RESIZE, "resize": ResizeMode.RESIZE,
    "crop and resize": ResizeMode.INNER_FIT, "inner fit (scale to fit)": ResizeMode.INNER_FIT,
    "resize and fill": ResizeMode.OUTER_FIT, "outer fit (shrink to fit)": ResizeMode.OUTER_FIT,
}
_CONTROL_ALIASES = {
    "balanced": ControlMode.BALANCED,
    "my prompt is more important": ControlMode.PROMPT,
    "controlnet is more important": ControlMode.CONTROL,
}
_HR_ALIASES = {o.value.lower(): o for o in HiResFixOption}


def _enum_value(value: Any, enum: type, aliases: Mapping[str, Any], field_name: str) -> Any:
    if isinstance(value, enum):
        return value
    if isinstance(value, bool):
        raise InvalidInputError(f"ControlNet unit: {field_name} must be one of "
                                f"{', '.join(repr(m.value) for m in enum)}, got {value!r}")
    if isinstance(value, int) or (isinstance(value, float) and float(value).is_integer()):
        members = list(enum)
        i = int(value)
        if 0 <= i < len(members):
            return members[i]  # legacy integer index (upstream before 1.1.449)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in aliases:
            return aliases[key]
        for m in enum:
            if key == m.name.lower():
                return m
    raise InvalidInputError(f"ControlNet unit: {field_name} must be one of "
                            f"{', '.join(repr(m.value) for m in enum)}, got {value!r}")


_FIELD_ALIASES = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "mask_image": "mask"}


@dataclass
class ControlNetUnit:
    """One ControlNet unit, with sd-webui-controlnet's field names and defaults."""

    enabled: bool = False
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None
    mask: Any = None
    resize_mode: ResizeMode = ResizeMode.INNER_FIT
    low_vram: bool = False
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    inpaint_crop_input_image: bool = True
    hr_option: HiResFixOption = HiResFixOption.BOTH
    save_detected_map: bool = True
    advanced_weighting: Optional[list] = None

    #: lines naming each slider value :meth:`bound_check_params` replaced (not a field: never sent or read)
    adjustments = ()

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = False) -> "ControlNetUnit":
        """Build a unit from an API dict. Unknown keys are ignored (upstream has many optional extras) unless
        ``strict``. Raises ``InvalidInputError`` (422) for bad enum strings, non-numbers and start > end."""
        if isinstance(d, ControlNetUnit):
            return d.validated()
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"ControlNet unit must be an object (dict), got {type(d).__name__}")
        names = set(cls.field_names())
        kw: Dict[str, Any] = {}
        for k, v in d.items():
            k = _FIELD_ALIASES.get(k, k)
            if k in names:
                kw[k] = v
            elif strict:
                raise InvalidInputError(f"ControlNet unit: unknown field {k!r}")
        return cls(**kw).validated()

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        for k in ("resize_mode", "control_mode", "hr_option"):
            out[k] = getattr(self, k).value
        return out

    def validated(self) -> "ControlNetUnit":
        """Normalise types/enums in place, reset out-of-range sliders, check the guidance window; returns self."""
        self.enabled = _as_bool(self.enabled, "enabled")
        self.low_vram = _as_bool(self.low_vram, "low_vram")
        self.pixel_perfect = _as_bool(self.pixel_perfect, "pixel_perfect")
        self.save_detected_map = _as_bool(self.save_detected_map, "save_detected_map")
        self.inpaint_crop_input_image = _as_bool(self.inpaint_crop_input_image, "inpaint_crop_input_image")
        self.module = "none" if self.module in (None, "") else str(self.module)
        self.model = "None" if self.model in (None, "", "none") else str(self.model)
        self.resize_mode = _enum_value(self.resize_mode, ResizeMode, _RESIZE_ALIASES, "resize_mode")
        self.control_mode = _enum_value(self.control_mode, ControlMode, _CONTROL_ALIASES, "control_mode")
        self.hr_option = _enum_value(self.hr_option, HiResFixOption, _HR_ALIASES, "hr_option")
        self.weight = _in_bounds(_as_float(self.weight, "weight"), "weight", 0.0, 2.0)
        self.guidance_start = _in_bounds(_as_float(self.guidance_start, "guidance_start"), "guidance_start", 0.0, 1.0)
        self.guidance_end = _in_bounds(_as_float(self.guidance_end, "guidance_end"), "guidance_end", 0.0, 1.0)
        if self.guidance_start > self.guidance_end:
            raise InvalidInputError(f"ControlNet unit: guidance_start ({self.guidance_start}) must not be greater "
                                    f"than guidance_end ({self.guidance_end})")
        for name in ("processor_res", "threshold_a", "threshold_b"):
            setattr(self, name, _as_float(getattr(self, name), name))
        if self.processor_res != int(self.processor_res):
            raise InvalidInputError(f"ControlNet unit: processor_res must be a whole number of pixels, got "
                                    f"{self.processor_res:g}")
        self.processor_res = int(self.processor_res)
        self.bound_check_params()
        if self.advanced_weighting is not None:
            try:
                self.advanced_weighting = [float(x) for x in self.advanced_weighting]
            except (TypeError, ValueError):
                raise InvalidInputError("ControlNet unit: advanced_weighting must be a list of numbers") from None
        return self

    def bound_check_params(self) -> None:
        """-1 -> the module's slider default; another value outside the slider's range -> the default too, as
        sd-webui-controlnet does, with a line in :attr:`adjustments` naming the value, the range and the default.
        Unknown modules keep their values (the module itself is reported when the unit runs)."""
        from .preprocessors import get_preprocessor  # local: preprocessors imports numpy/cv2/PIL only

        pre = get_preprocessor(self.module)
        if pre is None:
            return
        res, a, b, notes = pre.resolve(self.processor_res, self.threshold_a, self.threshold_b)
        if pre.resolution is not None:
            self.processor_res = int(res)
        if pre.slider_1 is not None:
            self.threshold_a = a
        if pre.slider_2 is not None:
            self.threshold_b = b
        self.adjustments = tuple(f"ControlNet unit ({pre.name}): {n}" for n in notes)


def _in_bounds(v: float, name: str, lo: float, hi: float) -> float:
    if v < lo or v > hi:
        raise InvalidInputError(f"ControlNet unit: {name} must be between {lo:g} and {hi:g}, got {v:g}")
    return v


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise InvalidInputError(f"ControlNet unit: {name} must be true or false, got {v!r}")


def _as_float(v: Any, name: str) -> float:
    if isinstance(v, bool):
        raise InvalidInputError(f"ControlNet unit: {name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InvalidInputError(f"ControlNet unit: {name} must be a number, got {v!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise InvalidInputError(f"ControlNet unit: {name} must be a finite number, got {v!r}")
    return f


__all__ = ["ControlNetUnit", "ResizeMode", "ControlMode", "HiResFixOption"]
