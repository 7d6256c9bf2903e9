"""Inference: each route is a translation of one Inference stream into its schema."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import InferenceDep
from server.api.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from server.api.streaming import sse_events
from server.api.waiting import result_of

router = APIRouter(prefix="/v1/tasks", tags=["inference"])  # inference token: server/api/access.py


@router.post(
    "/{task_id}/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the answer, or events if stream"}},
)
async def generate(task_id: str, body: GenerateRequest, request: Request, inference: InferenceDep):
    records = await inference.generate(task_id, body.fields(), body.sampling_overrides(), stream=body.stream)
    if body.stream:

        def final(rest: str, result) -> list:
            done = {"text": rest, "done": True, "task_id": task_id, "version": result.version,
                    "token_ids": result.token_ids, "finish_reason": result.finish_reason}  # fmt: skip
            return [done, "[DONE]"]

        events = sse_events(records, lambda text: {"text": text}, final)
        return StreamingResponse(events, media_type="text/event-stream")
    result = await result_of(request, records)
    return GenerateResponse(task_id=task_id, version=result.version, text=result.text, token_ids=result.token_ids,
                            finish_reason=result.finish_reason)  # fmt: skip


@router.post("/{task_id}/classify", response_model=ClassifyResponse)
async def classify(task_id: str, body: ClassifyRequest, request: Request, inference: InferenceDep):
    result = await result_of(request, await inference.classify(task_id, body.fields()))
    return ClassifyResponse(task_id=task_id, version=result.version, label=result.label, scores=result.scores)
