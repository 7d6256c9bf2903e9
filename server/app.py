"""The FastAPI application. `create_app` builds nothing heavy: the engine
(model, store, scheduler) is built in the lifespan and dropped at shutdown."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import InvalidRequest, PayloadTooLarge, PtserveError, ServiceUnavailable, TaskNotFound

from .engine import Engine
from .model import LoadedModel
from .routes import health, inference, tasks
from .settings import Settings

log = logging.getLogger(__name__)

_STATUS = {TaskNotFound: 404, PayloadTooLarge: 413, InvalidRequest: 422, ServiceUnavailable: 503}


def _status_of(error: PtserveError) -> int:
    for cls, status in _STATUS.items():
        if isinstance(error, cls):
            return status
    return 500


def create_app(settings: Settings, loaded: LoadedModel | None = None) -> FastAPI:
    """`loaded`: an already loaded model to serve instead of loading settings.model
    (tests share one tiny model between several servers)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await run_in_threadpool(Engine.from_settings, settings, loaded)
        engine.start()
        app.state.engine = engine
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="ptserve", summary="Many P-tuning soft prompts on one frozen LM", lifespan=lifespan)

    @app.exception_handler(PtserveError)
    async def _ptserve_error(request: Request, exc: PtserveError):
        return JSONResponse({"detail": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}): {exc}"}, status_code=500)

    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(inference.router)
    return app
