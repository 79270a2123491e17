"""HTTP routes shared by the standalone app and the WebUI adapter (``scripts/sdtoolkit_api.py``).

Each feature owns a module ``lib_sdtoolkit/server/routes_<feature>.py`` defining
``register(router: fastapi.APIRouter, host) -> None`` that adds routes under ``/sdtoolkit/v1/...``.
``make_router(host)`` imports whichever of those modules exist (in ``ROUTE_MODULES`` order) and calls them.

Errors: the router's route class turns any ``SdToolkitError`` raised by an endpoint into a JSON answer
``{"detail": "..."}`` with the error's ``http_status`` (400 bad input, 403 outside the model folders, 404 missing,
409 output exists, 422 invalid / incompatible). This works without app-level exception handlers, which matters in the
WebUI: its app has already served requests when ``on_app_started`` runs, so handlers added then would be ignored.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Any, Callable, Coroutine, List, Optional

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..errors import SdToolkitError
from ..host import MODEL_KINDS, Host
from ..plugins import import_present

log = logging.getLogger(__name__)

API_PREFIX = "/sdtoolkit/v1"
#: feature route modules, in registration order (missing ones are skipped)
ROUTE_MODULES = ("inspect", "merge", "maintenance", "lora", "tiled_vae", "controlnet")


def error_status(exc: SdToolkitError) -> int:
    status = int(getattr(exc, "http_status", 400) or 400)
    return status if 400 <= status < 500 else 400


def error_response(exc: SdToolkitError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))


class SdToolkitRoute(APIRoute):
    """APIRoute that answers ``SdToolkitError`` with 4xx JSON instead of a 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except SdToolkitError as exc:
                log.info("sdtoolkit API %s %s: %s", request.method, request.url.path, exc)
                return error_response(exc)

        return handler


def discover_route_modules(strict: bool = False) -> List[ModuleType]:
    """Import the ``routes_<feature>`` modules that exist. A module that fails to import is logged and skipped
    (raised when ``strict``), so one broken feature does not take the whole API down."""
    return import_present([f"{__name__}.routes_{name}" for name in ROUTE_MODULES], "routes", strict)


def _register_core(router: APIRouter, host: Host) -> None:
    @router.get(API_PREFIX + "/models")
    def list_models(kind: Optional[str] = None) -> dict:
        """Model files the host knows, per kind, as names relative to their folder (what ``path=`` accepts)."""
        kinds = [kind] if kind else list(MODEL_KINDS)
        out = {}
        for k in kinds:
            out[k] = [host.display_name(p, k) for p in host.list_models(k)]
        return {"models": out}

    @router.post(API_PREFIX + "/refresh")
    def refresh(kind: Optional[str] = None) -> dict:
        host.refresh(kind)
        return {"ok": True}


def make_router(host: Host, strict: bool = False) -> APIRouter:
    """The toolkit's APIRouter: core routes (models list, refresh) plus every feature's routes."""
    router = APIRouter(route_class=SdToolkitRoute, tags=["sdtoolkit"])
    _register_core(router, host)
    for mod in discover_route_modules(strict=strict):
        mod.register(router, host)
    return router


def install_error_handler(app: Any) -> None:
    """Also map ``SdToolkitError`` app-wide (for routes outside our router); harmless to call twice."""
    async def _handler(request: Request, exc: SdToolkitError) -> JSONResponse:
        return error_response(exc)

    app.add_exception_handler(SdToolkitError, _handler)


__all__ = ["API_PREFIX", "ROUTE_MODULES", "SdToolkitRoute", "make_router", "discover_route_modules",
           "error_response", "error_status", "install_error_handler"]
