"""The enums of a ControlNet unit (sd-webui-controlnet's display strings): resize mode, control mode, hires-fix
option. A leaf module: the unit and the preprocessors both read it."""
from __future__ import annotations

from enum import Enum


class ResizeMode(str, Enum):
    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"


class ControlMode(str, Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class HiResFixOption(str, Enum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


__all__ = ["ResizeMode", "ControlMode", "HiResFixOption"]
