"""Gradio builders for the toolkit's tabs, shared by the standalone app and the WebUI adapter.

Each tab is a module ``lib_sdtoolkit/ui/<name>_tab.py`` with ``TITLE: str``, ``ELEM_ID: str`` and
``build(host) -> None`` (called inside a ``gr.Tab``; builds components and wires events). ``build_tabs(host)``
imports whichever exist, in ``TAB_ORDER``. Works on gradio 3.41 (A1111) and 4.x (Forge): only ``gr.update(...)``.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional

import gradio as gr

from ..host import Host
from ..plugins import import_present

log = logging.getLogger(__name__)

TAB_ORDER = ("inspect", "merge", "prune", "hashes", "lora", "tiled_vae", "controlnet", "compare", "history")
APP_TITLE = "SD Toolkit"
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
STYLE_CSS = EXTENSION_ROOT / "style.css"


def discover_tabs(strict: bool = False) -> List[ModuleType]:
    """Import the ``<name>_tab`` modules that exist, in ``TAB_ORDER``. A tab that fails to import is logged and
    replaced by nothing (raised when ``strict``)."""
    return import_present([f"{__name__}.{name}_tab" for name in TAB_ORDER], "tab", strict)


def build_tabs(host: Host, strict: bool = False, blocks: Optional[gr.Blocks] = None) -> List[str]:
    """Build every available tab inside the current Blocks context. Returns the titles built.

    A tab whose ``build`` raises shows the error instead of taking the whole UI down (unless ``strict``). The model
    pickers the tabs declare (``common.register_picker``) are refreshed after every event that writes a model file
    (``common.writes``) and, with ``blocks``, when the page loads."""
    from .common import building_pickers

    with building_pickers() as pickers:
        titles = _build_each(host, strict)
    pickers.wire(host, blocks)
    return titles


#: pickers of tabs that do not declare them themselves (elem_id -> kinds, keep an empty value empty)
ADOPTED_PICKERS = {
    "sdtoolkit_lora_inspect_file": (("lora",), False),
    "sdtoolkit_lora_tuned": (("checkpoint",), True),
    "sdtoolkit_lora_base": (("checkpoint",), True),
    "sdtoolkit_lora_bake_ckpt": (("checkpoint",), True),
    "sdtoolkit_lora_inspect_model": (("checkpoint",), True),
    "sdtoolkit_lora_resize_file": (("lora",), False),
    "sdtoolkit_lora_merge_model": (("checkpoint",), True),
}


def _adopt_pickers(block: Any) -> None:
    """Register the dropdowns of :data:`ADOPTED_PICKERS` found under ``block`` (display names, single choice)."""
    from .common import register_picker

    for child in getattr(block, "children", None) or []:
        spec = ADOPTED_PICKERS.get(getattr(child, "elem_id", None) or "")
        if spec is not None and isinstance(child, gr.Dropdown):
            register_picker(child, spec[0], keep_empty=spec[1])
        _adopt_pickers(child)


def _build_each(host: Host, strict: bool) -> List[str]:
    titles = []
    for mod in discover_tabs(strict=strict):
        with gr.Tab(mod.TITLE, elem_id=f"sdtoolkit_tab_{mod.ELEM_ID}") as tab:
            try:
                mod.build(host)
                _adopt_pickers(tab)
            except Exception as exc:
                if strict:
                    raise
                log.exception("sdtoolkit: building tab %s failed", mod.TITLE)
                gr.Markdown(f"**{mod.TITLE} is unavailable:** `{type(exc).__name__}: {exc}`",
                            elem_classes=["sdtoolkit-error"])
        titles.append(mod.TITLE)
    return titles


def read_css() -> str:
    try:
        return STYLE_CSS.read_text(encoding="utf-8")
    except OSError:
        return ""


def build_webui_blocks(host: Host) -> gr.Blocks:
    """The Blocks the WebUI renders as its "SD Toolkit" tab (the WebUI adds style.css itself)."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Tabs(elem_id="sdtoolkit_tabs"):
            build_tabs(host, blocks=blocks)
    return blocks


def local_theme() -> Any:
    """The default theme with system fonts: the stock one fetches Google fonts, and nothing downloads at run time."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_app(host: Host, title: str = APP_TITLE) -> gr.Blocks:
    """The standalone app's Blocks: a header and every tab."""
    with gr.Blocks(title=title, css=read_css(), theme=local_theme(), analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}", elem_classes=["sdtoolkit-header"])
        with gr.Tabs(elem_id="sdtoolkit_tabs"):
            build_tabs(host, blocks=demo)
    return demo


def mount(app: Any, host: Host, path: str = "/", demo: Optional[gr.Blocks] = None) -> Any:
    """Mount the gradio app on a FastAPI ``app`` (``gr.mount_gradio_app``); returns the app."""
    if demo is None:
        demo = build_app(host)
    demo.queue()
    if gr.__version__.startswith("3."):
        _relax_queue_timeout(demo)
    return gr.mount_gradio_app(app, demo, path=path)


def _relax_queue_timeout(demo: gr.Blocks) -> None:
    """gradio 3.41's queue forwards each event to its own ``/api/predict`` through an httpx client. With httpx
    newer than the WebUI's 0.24.1 that client applies httpx's default 5 s timeout, so every handler running longer
    (a merge, writing the sample library) ends in an empty "Error". Lift the timeout once the queue made its client."""
    queue = getattr(demo, "_queue", None)
    start = getattr(queue, "start", None)
    if queue is None or start is None or not asyncio.iscoroutinefunction(start):
        return

    async def start_then_relax(*args: Any, **kwargs: Any) -> Any:
        result = await start(*args, **kwargs)
        client = getattr(queue, "queue_client", None)
        if client is not None and hasattr(client, "timeout"):
            import httpx

            client.timeout = httpx.Timeout(None)
        return result

    queue.start = start_then_relax


__all__ = ["TAB_ORDER", "discover_tabs", "build_tabs", "build_app", "build_webui_blocks", "mount"]
