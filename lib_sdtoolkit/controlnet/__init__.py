"""ControlNet: units, weight-free preprocessors, model loading, and the UNet hook (see DESIGN.md)."""
from .unit import ControlMode, ControlNetUnit, HiResFixOption, ResizeMode

__all__ = ["ControlNetUnit", "ResizeMode", "ControlMode", "HiResFixOption"]
