"""Is another ControlNet implementation active in this process (sd-webui-controlnet, Forge's built-in)?

Checked without importing the WebUI: Forge is recognised by its ``modules_forge`` package, sd-webui-controlnet and
Forge's sd_forge_controlnet by the packages their scripts import (``internal_controlnet``, ``lib_controlnet``), or by
an explicit host setting ``sdtoolkit_controlnet_external`` that the WebUI adapter sets from the extension list.
When one is present SD Toolkit registers neither its ``/controlnet/*`` routes nor its ControlNet script, and says so.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any, Mapping, Optional


def external_controlnet(settings: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """A human-readable reason when another ControlNet owns the ``/controlnet`` API and the "ControlNet" script,
    else None."""
    if settings:
        v = settings.get("sdtoolkit_controlnet_external")
        if v:
            return str(v)
    if any(name == "internal_controlnet" or name.startswith("internal_controlnet.") for name in sys.modules):
        return "the sd-webui-controlnet extension is installed"
    if any(name == "lib_controlnet" or name.startswith("lib_controlnet.") for name in sys.modules):
        return "Forge's built-in ControlNet (sd_forge_controlnet) is active"
    try:
        if importlib.util.find_spec("modules_forge") is not None:
            return "this is Forge, which ships its own ControlNet (sd_forge_controlnet)"
    except (ImportError, ValueError):
        pass
    return None


__all__ = ["external_controlnet"]
