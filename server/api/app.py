"""The FastAPI application. `create_app` builds nothing heavy: the engine
(model, store, scheduler) is built in the lifespan and dropped at shutdown."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from ptcore.errors import (
    Abandoned,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PtserveError,
    ServiceUnavailable,
)
from ptcore.model import LoadedModel
from server.api.errors import BadRequest, Forbidden, Unauthorized
from server.api.metrics import Metrics, MetricsMiddleware
from server.api.request_gate import RequestGate
from server.api.routes import fine_tuning, health, inference, openai, playground, tasks
from server.build import build_engine
from server.preload import preload
from server.settings import Settings

log = logging.getLogger(__name__)

_STATUS = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    PayloadTooLarge: 413,
    InvalidRequest: 422,
    Overloaded: 429,
    Abandoned: 499,  # nginx's "client closed request": nobody is there to read it
    ServiceUnavailable: 503,
    DeadlineExceeded: 504,
}
_HEADERS = {Unauthorized: {"WWW-Authenticate": "Bearer"}, Overloaded: {"Retry-After": "1"}}


def _status_of(error: PtserveError) -> int:
    for cls, status in _STATUS.items():
        if isinstance(error, cls):
            return status
    return 500


# errors also in OpenAI's shape, which its clients show
OPENAI_SHAPED = ("/v1/files", "/v1/fine_tuning/", "/v1/completions")


def error_response(error: PtserveError, path: str = "") -> JSONResponse:
    """{"detail": message}; on the fine-tuning routes also `param` (the request
    field at fault) and OpenAI's {"error": {message, type, param, code}}."""
    headers = next((h for cls, h in _HEADERS.items() if isinstance(error, cls)), None)
    status = _status_of(error)
    body = {"detail": str(error)}
    if path.startswith(OPENAI_SHAPED):
        param = getattr(error, "param", None)
        kind = "invalid_request_error" if status < 500 else "server_error"
        body.update(param=param, error={"message": str(error), "type": kind, "param": param, "code": None})
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(settings: Settings, loaded: LoadedModel | None = None) -> FastAPI:
    """`loaded`: an already loaded model to serve instead of loading settings.model
    (tests share one tiny model between several servers)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.api_token is None:
            log.warning("PTSERVE_API_TOKEN is not set: ANYONE who can reach this server can upload and delete prompts")
        engine = await run_in_threadpool(build_engine, settings, loaded)
        if settings.preload:
            await run_in_threadpool(preload, engine.tasks, settings.preload)
        engine.start()
        app.state.engine = engine
        try:
            yield
        finally:
            engine.stop()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline package, not a CDN
    app = FastAPIOffline(title="ptserve", summary="Many P-tuning soft prompts on one frozen LM", lifespan=lifespan)

    @app.exception_handler(PtserveError)
    async def _ptserve_error(request: Request, exc: PtserveError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        # FastAPI's own 422, ASCII-escaped: its errors quote the input, and a lone
        # surrogate sent as "\\ud800" has no UTF-8 encoding (a 500 otherwise)
        errors = jsonable_encoder(exc.errors())
        out = {"detail": errors}
        if request.url.path.startswith(OPENAI_SHAPED):  # also a message OpenAI's clients show
            where = lambda e: ".".join(str(part) for part in e.get("loc", ())[1:])  # noqa: E731 (without "body")
            message = "; ".join(f"{where(e)}: {e.get('msg')}" if where(e) else str(e.get("msg")) for e in errors)
            out["error"] = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return Response(json.dumps(out, ensure_ascii=True), status_code=422, media_type="application/json")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and uvicorn then closes the connection:
        # say so, so that clients do not send their next request on it
        body = {"detail": f"internal error ({type(exc).__name__}): {exc}"}
        return JSONResponse(body, status_code=500, headers={"Connection": "close"})

    app.state.settings = settings  # for the HTTP server's socket limits (server/api/http_server.py)
    metrics = Metrics(lambda: getattr(app.state, "engine", None))
    app.state.metrics = metrics
    app.add_middleware(RequestGate, settings=settings, respond=error_response)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(inference.router)
    app.include_router(inference.handwritten)
    app.include_router(openai.router)
    app.include_router(fine_tuning.router)
    app.include_router(playground.router)
    return app
