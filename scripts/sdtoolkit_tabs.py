"""WebUI adapter: the "SD Toolkit" tab (the same tabs as the standalone app, built by lib_sdtoolkit.ui).

Executed by the WebUI as a module named after this file, with the extension folder on sys.path only during the
exec: so lib_sdtoolkit is imported here at top level, and callbacks are registered here (re-run on "Reload UI").
"""
import importlib.util
import os

from modules import script_callbacks

import lib_sdtoolkit.ui as sdt_ui

TAB_TITLE = "SD Toolkit"
TAB_ID = "sdtoolkit"


def _webui_glue():
    """scripts/sdtoolkit_webui_host.py, loaded by path (WebUI scripts are not importable by name)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdtoolkit_webui_host.py")
    spec = importlib.util.spec_from_file_location("sdtoolkit_webui_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_host = _webui_glue().make_host


def on_ui_tabs():
    blocks = sdt_ui.build_webui_blocks(make_host())
    return [(blocks, TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
