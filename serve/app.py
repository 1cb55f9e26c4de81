"""The HTTP face of the service: FastAPI routes over :class:`~.engine.Service`, errors as JSON.

Every answer that is not a success is ``{"error": "<one line>", "status": <code>}``: 400 for a bad
parameter, 401 without a valid key, 403 for a read-only key that writes, 404 for an unknown route
or identity, 411 / 413 for a body without a length or over the limit, 413 for too many pixels, 422
for an upload that is not a readable image, a missing field or a photo without a face.

Authentication, the body limit and the request metrics are one ASGI layer (:class:`Gate`), so an
unauthenticated or oversized request is refused before its body is read. What needs a key: every
``/v1`` route and ``/metrics`` (a ``read`` key); enrolling and removing (a ``write`` key). The page
at ``/``, ``/health`` and the OpenAPI schema (``/openapi.json``, ``/docs``) are open.
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, File, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from facefuse import __version__
from facefuse.core.errors import FacefuseError, ParameterError

from .engine import NotFound, Service
from .metrics import CONTENT_TYPE
from .page import PAGE
from .settings import ServeSettings
from .uploads import UploadError

log = logging.getLogger("facefuse.serve")
KEY_HEADER = "x-api-key"
OPEN_PATHS = ("/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
ALIGN_HELP = "none: the upload is an aligned crop; landmarks: every face found by MTCNN; haar: the largest face"

# documentation only: the Gate decides (these never refuse)
_key_doc = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (or Authorization: Bearer KEY)")
_bearer_doc = HTTPBearer(auto_error=False)


def create_app(settings: ServeSettings) -> FastAPI:
    """The application; the model and gallery load here, so a bad setting fails before serving."""
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="facefuse", version=__version__, lifespan=lifespan,
                  description="Face verification, search and enrolment over one resident model and gallery.")
    app.state.service = service
    _routes(app, service)
    _errors(app)
    app.add_middleware(Gate, service=service)
    return app


# ---------------------------------------------------------------- routes


def _routes(app: FastAPI, s: Service) -> None:
    secured = [Security(_key_doc), Security(_bearer_doc)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    @app.get("/health", tags=["service"])
    async def health():
        """Liveness and what is loaded (no key needed)."""
        return await s.health()

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"], dependencies=secured)
    async def metrics():
        """Counters and histograms in Prometheus' text format."""
        return PlainTextResponse(await s.metrics_text(), media_type=CONTENT_TYPE)

    @app.post("/v1/verify", tags=["faces"], dependencies=secured)
    async def verify(a: UploadFile = File(..., description="first photo"),
                     b: UploadFile = File(..., description="second photo"),
                     align: str | None = Query(None, description=ALIGN_HELP),
                     threshold: float | None = Query(None, description="decide at this cosine"),
                     far: float | None = Query(None, description="decide at the threshold calibrated at this FAR")):
        """Are the largest faces of two photos the same person? Cosine score and the decision at the
        calibrated threshold (and its FAR), or at ``threshold``."""
        return await s.verify(await a.read(), await b.read(), align=align, threshold=threshold, far=far)

    @app.post("/v1/search", tags=["faces"], dependencies=secured)
    async def search(photo: UploadFile = File(..., description="a photo (or an aligned crop with align=none)"),
                     align: str | None = Query(None, description=ALIGN_HELP),
                     top_k: int = Query(5, description="identities per face"),
                     threshold: float | None = Query(None, description="unknown below this cosine"),
                     far: float | None = Query(None, description="unknown below the threshold calibrated at this FAR")):
        """Every face of a photo, largest first: its box, landmarks and top-k identities (``unknown``
        below the threshold)."""
        return await s.search(await photo.read(), align=align, top_k=top_k, threshold=threshold, far=far)

    @app.get("/v1/identities", tags=["gallery"], dependencies=secured)
    async def identities():
        """Enrolled identities, first-enrolled first."""
        return await s.identities()

    @app.post("/v1/identities/{identity}/faces", tags=["gallery"], dependencies=secured, status_code=201)
    async def enrol(identity: str = Path(..., description="who the face is"),
                    photo: UploadFile = File(..., description="a photo with the face (largest face enrolled)"),
                    align: str | None = Query(None, description=ALIGN_HELP)):
        """Enrol the photo's largest face under ``identity`` (a write key); answered once durable.
        ``image`` in the answer names this enrolment for removal."""
        return await s.enrol(identity, await photo.read(), align=align)

    @app.delete("/v1/identities/{identity}", tags=["gallery"], dependencies=secured)
    async def remove_identity(identity: str):
        """Forget every face of ``identity`` (a write key); gone from searches when answered."""
        return await s.remove(identity)

    @app.delete("/v1/identities/{identity}/faces/{image}", tags=["gallery"], dependencies=secured)
    async def remove_face(identity: str, image: str):
        """Forget the faces of ``identity`` enrolled from ``image`` (the label an enrolment answered)."""
        return await s.remove(identity, image)


# ---------------------------------------------------------------- errors


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload(_, exc: UploadError):
        return error(exc.status, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(_, exc: NotFound):
        return error(404, str(exc))

    @app.exception_handler(ParameterError)
    async def parameter(_, exc: ParameterError):
        return error(400, str(exc))

    @app.exception_handler(FacefuseError)
    async def facefuse(_, exc: FacefuseError):
        log.error("request failed: %s", exc)
        return error(500, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http(_, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.exception("unexpected error")
        return error(500, f"internal error ({type(exc).__name__})")


# ---------------------------------------------------------------- the gate


class Gate:
    """Pure ASGI layer before the routes: API keys, the body limit, request metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if status[0] == 404 else "refused")
            self.service.metrics.request(label, scope["method"], status[0], time.perf_counter() - start)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        if method in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                return error(411, "a request body needs a Content-Length header")
            if not length.isdigit():
                return error(400, f"Content-Length {length!r}: not a number")
            if int(length) > self.service.settings.max_upload_bytes:
                return error(413, f"request body of {int(length)} bytes is over the limit of "
                                  f"{self.service.settings.max_upload_bytes}")
        keys = self.service.keys
        if keys is None or path in OPEN_PATHS:
            return None
        key = headers.get(KEY_HEADER)
        auth = headers.get("authorization", "")
        if key is None and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        who = keys.check(key)
        if who is None:
            return error(401, "a valid API key is needed (X-API-Key or Authorization: Bearer)" if key is None
                         else "API key not recognised", {"WWW-Authenticate": "Bearer"})
        if method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith("/v1/identities") and not who.can_write:
            return error(403, f"key {who.name!r} is read-only: enrolling and removing need a write key")
        scope.setdefault("state", {})["principal"] = who
        return None
