"""Inference: the routes resolve the task, then only submit to the scheduler."""

import asyncio

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from .deps import EngineDep

router = APIRouter(prefix="/v1/tasks", tags=["inference"])


@router.post("/{task_id}/generate", response_model=GenerateResponse)
async def generate(task_id: str, body: GenerateRequest, engine: EngineDep):
    work = await run_in_threadpool(engine.prepare_generate, task_id, body.fields(), body.sampling_overrides())
    result = await asyncio.wrap_future(engine.submit(work))
    return GenerateResponse(
        task_id=task_id,
        version=work.prompt.version,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
    )


@router.post("/{task_id}/classify", response_model=ClassifyResponse)
async def classify(task_id: str, body: ClassifyRequest, engine: EngineDep):
    work = await run_in_threadpool(engine.prepare_classify, task_id, body.fields())
    result = await asyncio.wrap_future(engine.submit(work))
    return ClassifyResponse(task_id=task_id, version=work.prompt.version, label=result.label, scores=result.scores)
