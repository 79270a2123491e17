"""WebUI adapter: mounts the toolkit's HTTP routes (/sdtoolkit/v1/...) on the WebUI's FastAPI app.

Works under --nowebui too: there on_app_started gets demo=None and on_ui_tabs is never called, so nothing here
depends on the UI. --sdtoolkit-no-api (preload.py) turns the routes off.
"""
import importlib.util

from modules import paths, script_callbacks, shared

import lib_sdtoolkit.host as sdt_host
import lib_sdtoolkit.server as sdt_server


def _refresh_checkpoints():
    from modules import sd_models
    sd_models.list_models()


def _refresh_vae():
    from modules import sd_vae
    sd_vae.refresh_vae_list()


def make_host():
    return sdt_host.webui_host_from(
        paths, shared.cmd_opts, shared.opts,
        refreshers={"checkpoint": _refresh_checkpoints, "vae": _refresh_vae},
        forge=importlib.util.find_spec("modules_forge") is not None,
    )


def on_app_started(demo, app):
    if getattr(shared.cmd_opts, "sdtoolkit_no_api", False):
        return
    existing = {getattr(r, "path", None) for r in getattr(app, "routes", [])}
    if sdt_server.API_PREFIX + "/models" in existing:
        return  # already mounted on this app (callbacks ran twice)
    app.include_router(sdt_server.make_router(make_host()))


script_callbacks.on_app_started(on_app_started)
