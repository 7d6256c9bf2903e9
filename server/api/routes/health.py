"""Liveness, readiness and batching statistics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, MetricsDep, StartingEngineDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(engine: StartingEngineDep):
    if engine is None:
        return JSONResponse({"status": "loading", "detail": "model is not loaded yet"}, status_code=503)
    reason = await run_in_threadpool(engine.why_not_ready)
    if reason is not None:
        return JSONResponse({"status": "unavailable", "detail": reason}, status_code=503)
    return {"status": "ready", "model": engine.loaded.info}


@router.get("/v1/stats")
async def stats(engine: EngineDep):
    """Batch sizes of every forward batch so far, prompt-cache counters, queue depth."""
    return engine.stats()


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep):
    """Prometheus metrics: requests by route/task/status, latencies, generated tokens,
    queue depth, running rows, batch sizes, prompt- and prefix-cache counters."""
    return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE_LATEST)
