"""Drives the WebUI double through the WebUI's start-up order for one extension folder.

    from webui_harness import WebUIDouble          # after use_double() / with tests/webui_double on sys.path
    w = WebUIDouble(extension_dir, data_dir)
    w.run_installer()                 # install.py as a subprocess, PYTHONPATH=<double>  (reference section 1.1)
    args = w.preload(["--sdtoolkit-device", "cpu"])   # preload(parser) + strict parse_args (section 1.2)
    w.load_scripts()                  # exec scripts/*.py like modules/scripts.py (section 1.4)
    demo, tabs = w.create_ui()        # before_ui, ui_settings, ui_tabs -> gr.TabItem per tab (section 1.6)
    app = w.start_app(demo)           # FastAPI + app_started_callback(demo, app); start_app(None) = --nowebui
    app = w.start_app(demo, api=True) # with the WebUI's own /sdapi/v1 routes (--api), mounted first as create_api

    use_forge("forge201" | "neo") / unuse_forge(): Forge's root packages (modules_forge, backend) of one flavour on
    sys.path after the double (forge/README.md).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Optional, Sequence, Tuple

DOUBLE_DIR = os.path.dirname(os.path.abspath(__file__))


def use_double() -> None:
    """Put the double first on sys.path so ``import modules`` / ``import launch`` resolve to it."""
    if sys.path[:1] != [DOUBLE_DIR]:
        if DOUBLE_DIR in sys.path:
            sys.path.remove(DOUBLE_DIR)
        sys.path.insert(0, DOUBLE_DIR)
    mod = sys.modules.get("modules")
    if mod is not None and not os.path.abspath(getattr(mod, "__file__", "") or "").startswith(DOUBLE_DIR):
        raise RuntimeError(f"another 'modules' package is already imported: {mod!r}")


FORGE_FLAVOURS = ("forge201", "neo")
_FORGE_PACKAGES = ("modules_forge", "backend")


def _forget_forge_modules() -> None:
    for name in list(sys.modules):
        if name.split(".", 1)[0] in _FORGE_PACKAGES:
            del sys.modules[name]


def use_forge(flavour: str) -> str:
    """Forge = the A1111 double plus Forge's root packages (``modules_forge``, ``backend``) of one flavour
    (forge/README.md): put that flavour's folder on ``sys.path`` right after the double; returns the folder."""
    if flavour not in FORGE_FLAVOURS:
        raise ValueError(f"unknown Forge flavour {flavour!r}; one of {FORGE_FLAVOURS}")
    use_double()
    unuse_forge()
    folder = os.path.join(DOUBLE_DIR, "forge", flavour)
    sys.path.insert(1, folder)
    return folder


def unuse_forge() -> None:
    """Back to plain A1111: no Forge flavour on ``sys.path`` and none of its modules imported."""
    for flavour in FORGE_FLAVOURS:
        folder = os.path.join(DOUBLE_DIR, "forge", flavour)
        while folder in sys.path:
            sys.path.remove(folder)
    _forget_forge_modules()


class WebUIDouble:
    def __init__(self, extension_dir: str, data_dir: str) -> None:
        use_double()
        from modules import errors, paths_internal

        self.extension_dir = os.path.abspath(extension_dir)
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(os.path.join(self.data_dir, "models"), exist_ok=True)
        paths_internal.set_data_dir(self.data_dir)
        errors.reported.clear()
        self._fresh_process_state()
        self.parser = None

    def _fresh_process_state(self) -> None:
        """A WebUI process starts with its own data dir: module-level state computed at import from an earlier
        double's data dir (the hash cache's folder and open diskcache handles) is reset as a new process has it."""
        cache = sys.modules.get("modules.cache")
        if cache is not None:
            for c in list(cache.caches.values()):
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - best effort, as at process exit
                    pass
            cache.caches.clear()
            cache.cache_filename = os.environ.get("SD_WEBUI_CACHE_FILE", os.path.join(self.data_dir, "cache.json"))
            cache.cache_dir = os.environ.get("SD_WEBUI_CACHE_DIR", os.path.join(self.data_dir, "cache"))

    # 1.1 launch.py: run_extensions_installers
    def run_installer(self, env: Optional[dict] = None) -> "subprocess.CompletedProcess[str]":
        path_installer = os.path.join(self.extension_dir, "install.py")
        full_env = os.environ.copy()
        full_env.update(env or {})
        full_env["PYTHONPATH"] = f"{DOUBLE_DIR}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
        return subprocess.run([sys.executable, path_installer], cwd=self.extension_dir, env=full_env,
                              capture_output=True, text=True, timeout=120)

    # 1.2 shared_cmd_options: preload_extensions, then a strict parse_args
    def preload(self, argv: Sequence[str] = ()) -> Any:
        from modules import cmd_args, script_loading, shared

        from modules import paths_internal

        parser = cmd_args.make_parser()
        script_loading.preload_extensions(os.path.dirname(self.extension_dir), parser,
                                          extension_list=[os.path.basename(self.extension_dir)])
        # then every built-in extension's preload.py, enabled or not (the built-in Lora adds --lora-dir)
        script_loading.preload_extensions(paths_internal.extensions_builtin_dir, parser)
        args = parser.parse_args(list(argv))  # unknown flag -> SystemExit(2), as in the WebUI
        shared.parser = parser
        shared.cmd_opts = args
        self.parser = parser
        return args

    # 1.4 scripts.load_scripts
    def load_scripts(self) -> List[Any]:
        from modules import scripts

        scripts.extension_dirs[:] = [self.extension_dir]
        return scripts.load_scripts()

    # 1.6 webui(): before_ui -> create_ui (settings, tabs)
    def create_ui(self) -> Tuple[Any, list]:
        import gradio as gr
        from modules import script_callbacks

        script_callbacks.before_ui_callback()
        script_callbacks.ui_settings_callback()
        interfaces = script_callbacks.ui_tabs_callback()
        with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
            with gr.Tabs(elem_id="tabs"):
                for interface, label, ifid in interfaces:
                    with gr.TabItem(label, id=ifid, elem_id="tab_" + ifid):
                        interface.render()
        return demo, interfaces

    # 1.6 create_api(app) with --api / --nowebui, then app_started_callback(demo, app); demo is None under --nowebui
    def start_app(self, demo: Any = None, api: bool = False) -> Any:
        from fastapi import FastAPI
        from modules import script_callbacks

        app = FastAPI()
        if api:
            from modules.api.api import Api
            from modules.call_queue import queue_lock

            Api(app, queue_lock)
        script_callbacks.app_started_callback(demo, app)
        return app

    @property
    def reported_errors(self) -> List[str]:
        from modules import errors

        return list(errors.reported)
