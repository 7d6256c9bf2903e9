"""Inference: each route is a translation of one Inference stream into its schema."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import InferenceDep
from server.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    HandWrittenClassifyRequest,
    HandWrittenGenerateRequest,
)
from server.api.streaming import sse_events
from server.api.waiting import result_of
from server.handwritten import TASK_ID, HandWritten

router = APIRouter(prefix="/v1/tasks", tags=["inference"])  # inference token: server/api/access.py


@router.post(
    "/{task_id}/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the answer, or events if stream"}},
)
async def generate(task_id: str, body: GenerateRequest, request: Request, inference: InferenceDep):
    return await _generate(task_id, task_id, body, request, inference)


async def _generate(task_id: str, prompt: str | HandWritten, body: GenerateRequest, request: Request, inference):
    """One generate answer, streamed or whole; `prompt`: the task id, or a hand-written prompt."""
    records = await inference.generate(prompt, body.fields(), body.sampling_overrides(), body.stream, body.version)
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
    result = await result_of(request, await inference.classify(task_id, body.fields(), body.version))
    return ClassifyResponse(task_id=task_id, version=result.version, label=result.label, scores=result.scores)


# A hand-written prompt, run on the served model with no stored prompt (server/handwritten.py): what a
# P-tuned task is compared with. Its answers name the task "(hand-written)", version 0.
handwritten = APIRouter(prefix="/v1/handwritten", tags=["inference"])


@handwritten.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the answer, or events if stream"}},
)
async def generate_handwritten(body: HandWrittenGenerateRequest, request: Request, inference: InferenceDep):
    prompt = HandWritten(body.template, "generate")
    return await _generate(TASK_ID, prompt, body, request, inference)


@handwritten.post("/classify", response_model=ClassifyResponse)
async def classify_handwritten(body: HandWrittenClassifyRequest, request: Request, inference: InferenceDep):
    prompt = HandWritten(body.template, "classify", tuple(body.labels.items()))
    result = await result_of(request, await inference.classify(prompt, body.fields()))
    return ClassifyResponse(task_id=TASK_ID, version=result.version, label=result.label, scores=result.scores)
