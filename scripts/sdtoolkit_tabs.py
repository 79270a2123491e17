"""WebUI adapter: the "SD Toolkit" tab (the same tabs as the standalone app, built by lib_sdtoolkit.ui).

Executed by the WebUI as a module named after this file, with the extension folder on sys.path only during the
exec: so lib_sdtoolkit is imported here at top level, and callbacks are registered here (re-run on "Reload UI").
"""
import importlib.util

from modules import paths, script_callbacks, shared

import lib_sdtoolkit.host as sdt_host
import lib_sdtoolkit.ui as sdt_ui

TAB_TITLE = "SD Toolkit"
TAB_ID = "sdtoolkit"


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


def on_ui_tabs():
    blocks = sdt_ui.build_webui_blocks(make_host())
    return [(blocks, TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
