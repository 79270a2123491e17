"""The standalone web app: FastAPI with the toolkit's router and the gradio UI mounted at ``/``."""
from __future__ import annotations


from fastapi import FastAPI

from .. import __version__
from ..host import Host
from . import install_error_handler, make_router


def create_app(host: Host, ui: bool = True) -> FastAPI:
    """FastAPI app: ``/sdtoolkit/v1/...`` routes, plus the gradio UI at ``/`` when ``ui`` (gradio is imported only
    then, and only through ``lib_sdtoolkit.ui``)."""
    app = FastAPI(title="SD Toolkit", version=__version__)
    install_error_handler(app)
    app.include_router(make_router(host))
    if ui:
        from ..ui import mount

        app = mount(app, host, path="/")
    return app


__all__ = ["create_app"]
