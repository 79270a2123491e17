"""Import the feature modules that plug into a face (CLI commands, UI tabs, API routes).

Each face lists its module names in a fixed order; a module that is not there is skipped, and one that fails to
import is logged and skipped (or raised when ``strict``), so one broken feature does not take a whole face down.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Iterable, List

log = logging.getLogger(__name__)


def import_present(names: Iterable[str], what: str, strict: bool = False) -> List[ModuleType]:
    """The modules among ``names`` (dotted) that exist, imported, in order."""
    found = []
    for modname in names:
        try:
            if importlib.util.find_spec(modname) is None:
                continue
        except ModuleNotFoundError:  # a parent package is missing
            continue
        try:
            found.append(importlib.import_module(modname))
        except Exception:
            if strict:
                raise
            log.exception("sdtoolkit: could not import %s; its %s is not available", modname, what)
    return found


def load_file_module(path: str, name: str) -> ModuleType:
    """Execute a Python file as a fresh module (for WebUI scripts, which the WebUI runs as unimportable modules
    and which share helpers by path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
