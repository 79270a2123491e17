"""WebUI adapter: mounts the toolkit's HTTP routes (/sdtoolkit/v1/...) on the WebUI's FastAPI app.

Works under --nowebui too: there on_app_started gets demo=None and on_ui_tabs is never called, so nothing here
depends on the UI. --sdtoolkit-no-api (preload.py) turns the routes off.
"""
import os

from modules import script_callbacks, shared

import lib_sdtoolkit.server as sdt_server
from lib_sdtoolkit.plugins import load_file_module

# shared WebUI glue (host over the WebUI's folders, the loaded model); scripts are not importable by name
make_host = load_file_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdtoolkit_webui_host.py"),
                             "sdtoolkit_webui_host").make_host


def on_app_started(demo, app):
    if getattr(shared.cmd_opts, "sdtoolkit_no_api", False):
        return
    existing = {getattr(r, "path", None) for r in getattr(app, "routes", [])}
    if sdt_server.API_PREFIX + "/models" in existing:
        return  # already mounted on this app (callbacks ran twice)
    app.include_router(sdt_server.make_router(make_host()))


script_callbacks.on_app_started(on_app_started)
