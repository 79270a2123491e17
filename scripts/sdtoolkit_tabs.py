"""WebUI adapter: the "SD Toolkit" tab (the same tabs as the standalone app, built by lib_sdtoolkit.ui).

Executed by the WebUI as a module named after this file, with the extension folder on sys.path only during the
exec: so lib_sdtoolkit is imported here at top level, and callbacks are registered here (re-run on "Reload UI").
"""
import os

from modules import script_callbacks

import lib_sdtoolkit.ui as sdt_ui
from lib_sdtoolkit.plugins import load_file_module

TAB_TITLE = "SD Toolkit"
TAB_ID = "sdtoolkit"


# shared WebUI glue (host over the WebUI's folders, the loaded model); scripts are not importable by name
make_host = load_file_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdtoolkit_webui_host.py"),
                             "sdtoolkit_webui_host").make_host


def on_ui_tabs():
    blocks = sdt_ui.build_webui_blocks(make_host())
    return [(blocks, TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
