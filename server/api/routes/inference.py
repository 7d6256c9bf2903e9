"""Inference: the routes resolve the task, then only submit to the scheduler."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import EngineDep
from server.api.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from server.api.streaming import stream_generation
from server.api.waiting import wait_for_result

router = APIRouter(prefix="/v1/tasks", tags=["inference"])  # inference token: server/api/access.py


@router.post(
    "/{task_id}/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the answer, or events if stream"}},
)
async def generate(task_id: str, body: GenerateRequest, request: Request, engine: EngineDep):
    fields, overrides = body.fields(), body.sampling_overrides()
    work = await request.app.state.lanes.prepare(engine.inference.prepare_generate, task_id, fields, overrides)
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
    work = await request.app.state.lanes.prepare(engine.inference.prepare_classify, task_id, body.fields())
    result = await wait_for_result(request, engine, work)
    return ClassifyResponse(task_id=task_id, version=work.prompt.version, label=result.label, scores=result.scores)
