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

import asyncio
import logging
import math
import uuid
import weakref
from types import ModuleType
from typing import Any, Awaitable, Callable, Coroutine, List, Optional

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError, WebSocketException
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..errors import SdToolkitError
from ..host import MODEL_KINDS, Host
from ..plugins import import_present
from ..validate import MAX_BODY_BYTES

log = logging.getLogger(__name__)

API_PREFIX = "/sdtoolkit/v1"
#: feature route modules, in registration order (missing ones are skipped)
ROUTE_MODULES = ("inspect", "merge", "maintenance", "lora", "lora_convert", "tiled_vae", "controlnet", "workflow")


def error_status(exc: SdToolkitError) -> int:
    status = int(getattr(exc, "http_status", 400) or 400)
    return status if 400 <= status < 500 else 400


def error_response(exc: SdToolkitError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=error_status(exc))


#: routes that only list or describe (no file contents read, no tensors): they never wait for a job slot
CHEAP_ROUTES = frozenset({
    API_PREFIX + "/models", API_PREFIX + "/merge/presets", API_PREFIX + "/merge/current", "/controlnet/version",
    "/controlnet/model_list", "/controlnet/module_list", "/controlnet/control_types", "/controlnet/settings",
})
#: file / tensor jobs that may run at once (each in a worker thread); more wait (in the event loop, holding no
#: thread) so that the cheap routes and the rest of the app always find a free worker thread
DEFAULT_MAX_JOBS = 4
#: jobs that may wait for a slot; more are answered 429
DEFAULT_MAX_WAITING = 64


class _JobSlots:
    """Per-event-loop counting semaphore for the heavy routes (an asyncio primitive binds to one loop)."""

    def __init__(self, jobs: int, waiting: int) -> None:
        self.jobs = max(1, int(jobs))
        self.max_waiting = max(0, int(waiting))
        self._sems: "weakref.WeakKeyDictionary[Any, asyncio.Semaphore]" = weakref.WeakKeyDictionary()
        self.waiting = 0

    def _sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.jobs)
        return sem


def _error_id() -> str:
    return uuid.uuid4().hex[:8]


def internal_error_response(request: Request, exc: BaseException) -> JSONResponse:
    """A 500 JSON body with a short id; the traceback goes to the log under that id."""
    eid = _error_id()
    log.error("sdtoolkit API %s %s: internal error %s", request.method, request.url.path, eid,
              exc_info=(type(exc), exc, exc.__traceback__))
    return JSONResponse({"detail": f"internal error {eid} (the server log has the details)", "error_id": eid},
                        status_code=500)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body too large (at most {limit} bytes)")


def _limited_receive(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
        return message

    return wrapped


class SdToolkitRoute(APIRoute):
    """APIRoute that answers ``SdToolkitError`` with 4xx JSON instead of a 500, refuses bodies over
    ``max_body_bytes`` (413), runs heavy routes through a bounded number of job slots, and turns any other
    exception into a 500 JSON body with a short id (traceback logged)."""

    max_body_bytes: int = MAX_BODY_BYTES
    job_slots: Optional[_JobSlots] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        limit = int(self.max_body_bytes)
        slots = self.job_slots if self.path not in CHEAP_ROUTES else None

        async def run(request: Request) -> Response:
            length = request.headers.get("content-length")
            if length is not None:
                try:
                    if int(length) > limit:
                        raise _BodyTooLarge(limit)
                except ValueError:
                    raise HTTPException(status_code=400, detail="bad Content-Length header") from None
            request = Request(request.scope, _limited_receive(request.receive, limit))
            if slots is None:
                return await original(request)
            sem = slots._sem()
            if sem.locked() and slots.waiting >= slots.max_waiting:
                raise HTTPException(status_code=429, detail=f"too many jobs waiting ({slots.waiting}); try later")
            slots.waiting += 1
            try:
                await sem.acquire()
            finally:
                slots.waiting -= 1
            try:
                return await original(request)
            finally:
                sem.release()

        async def handler(request: Request) -> Response:
            try:
                return await run(request)
            except SdToolkitError as exc:
                log.info("sdtoolkit API %s %s: %s", request.method, request.url.path, exc)
                return error_response(exc)
            except (StarletteHTTPException, RequestValidationError, WebSocketException):
                raise  # FastAPI's own 4xx answers
            except Exception as exc:  # noqa: BLE001 - the catch-all: a short id in the answer, the traceback logged
                return internal_error_response(request, exc)

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


def make_router(host: Host, strict: bool = False, max_body_bytes: Optional[int] = None,
                max_jobs: Optional[int] = None) -> APIRouter:
    """The toolkit's APIRouter: core routes (models list, refresh) plus every feature's routes.

    ``max_body_bytes`` (default ``settings["sdtoolkit_api_max_body_mb"]`` MiB or 64 MiB) bounds every request body;
    ``max_jobs`` (default ``settings["sdtoolkit_api_max_jobs"]`` or 4) bounds the file / tensor jobs run at once."""
    settings = getattr(host, "settings", None) or {}
    if max_body_bytes is None:
        mb = _setting_number(settings, "sdtoolkit_api_max_body_mb")
        max_body_bytes = int(mb * 1024 * 1024) if mb else MAX_BODY_BYTES
    if max_jobs is None:
        max_jobs = int(_setting_number(settings, "sdtoolkit_api_max_jobs") or DEFAULT_MAX_JOBS)
    route_class = type("SdToolkitRoute", (SdToolkitRoute,),
                       {"max_body_bytes": int(max_body_bytes), "job_slots": _JobSlots(max_jobs, DEFAULT_MAX_WAITING)})
    router = APIRouter(route_class=route_class, tags=["sdtoolkit"])
    _register_core(router, host)
    for mod in discover_route_modules(strict=strict):
        mod.register(router, host)
    return router


def _setting_number(settings: Any, key: str) -> Optional[float]:
    try:
        v = float(settings.get(key) or 0)
    except (TypeError, ValueError, AttributeError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def install_error_handler(app: Any) -> None:
    """Also map ``SdToolkitError`` app-wide (for routes outside our router); harmless to call twice."""
    async def _handler(request: Request, exc: SdToolkitError) -> JSONResponse:
        return error_response(exc)

    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request, exc)

    app.add_exception_handler(SdToolkitError, _handler)
    app.add_exception_handler(Exception, _internal)  # outside our router: still a JSON 500 with an id


__all__ = ["API_PREFIX", "ROUTE_MODULES", "SdToolkitRoute", "make_router", "discover_route_modules",
           "error_response", "error_status", "install_error_handler", "internal_error_response", "CHEAP_ROUTES",
           "DEFAULT_MAX_JOBS"]
