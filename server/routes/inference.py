"""Inference: the routes resolve the task, then only submit to the scheduler."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import Abandoned, DeadlineExceeded

from ..schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from ..streaming import POLL_S, stream_generation
from .deps import EngineDep, InferenceAccess

router = APIRouter(prefix="/v1/tasks", tags=["inference"], dependencies=[InferenceAccess])


async def wait_for_result(request: Request, engine, work):
    """Submit `work` and wait for its result. A client that goes away, or a
    request past the deadline, has its work abandoned: dropped from the queue,
    or its row retired at the next step, so its batch slot is freed."""
    future = asyncio.wrap_future(engine.submit(work))
    timeout = engine.settings.request_timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if future.done():
            return future.result()
        remaining = deadline - loop.time()
        if remaining <= 0:
            work.abandoned = True
            future.cancel()  # still queued: never runs
            raise DeadlineExceeded(f"the request did not finish within {timeout:g} s")
        done, _ = await asyncio.wait({future}, timeout=min(POLL_S, remaining))
        if done:
            return future.result()
        if await request.is_disconnected():
            work.abandoned = True
            future.cancel()
            raise Abandoned("the client went away")


@router.post(
    "/{task_id}/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the answer, or events if stream"}},
)
async def generate(task_id: str, body: GenerateRequest, request: Request, engine: EngineDep):
    work = await run_in_threadpool(engine.prepare_generate, task_id, body.fields(), body.sampling_overrides())
    if body.stream:

        def final(rest: str, result) -> list:
            done = {"text": rest, "done": True, "task_id": task_id, "version": work.prompt.version,
                    "token_ids": result.token_ids, "finish_reason": result.finish_reason}  # fmt: skip
            request.app.state.metrics.generated_tokens.labels(task_id).inc(len(result.token_ids))
            return [done, "[DONE]"]

        events = await stream_generation(request, engine, work, lambda text: {"text": text}, final)
        return StreamingResponse(events, media_type="text/event-stream")
    result = await wait_for_result(request, engine, work)
    request.app.state.metrics.generated_tokens.labels(task_id).inc(len(result.token_ids))
    return GenerateResponse(
        task_id=task_id,
        version=work.prompt.version,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
    )


@router.post("/{task_id}/classify", response_model=ClassifyResponse)
async def classify(task_id: str, body: ClassifyRequest, request: Request, engine: EngineDep):
    work = await run_in_threadpool(engine.prepare_classify, task_id, body.fields())
    result = await wait_for_result(request, engine, work)
    return ClassifyResponse(task_id=task_id, version=work.prompt.version, label=result.label, scores=result.scores)
