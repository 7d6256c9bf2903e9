"""OpenAI-compatible completions: `model` is the task id, `prompt` its {input}.

A router that sends each task to one replica cannot read `model` from the body;
clients name the task again in the X-Ptserve-Task header, which nginx hashes on
(deploy/nginx.conf). The header is optional; when present it must equal `model`.
"""

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from prompt_store.template import parse_template
from server.api.deps import InferenceDep, JobsDep, TasksDep
from server.api.errors import BadRequest
from server.api.schemas import CompletionRequest
from server.api.streaming import sse_events
from server.api.waiting import result_of

router = APIRouter(prefix="/v1", tags=["openai"])  # inference token: server/api/access.py


@router.get("/models")
async def list_models(tasks: TasksDep, jobs: JobsDep):
    """The served base model (what fine-tuning jobs start from, marked
    `ptserve_base_model`), then every generate task, as OpenAI models."""
    summaries = await run_in_threadpool(tasks.list)
    base = {"id": jobs.base_model, "object": "model", "created": 0, "owned_by": "ptserve", "ptserve_base_model": True}
    return {
        "object": "list",
        "data": [base]
        + [
            {"id": t["task_id"], "object": "model", "created": 0, "owned_by": "ptserve"}
            for t in summaries
            if t["task_type"] == "generate" and completable(t["template"])
        ],
    }


def completable(template: str) -> bool:
    """Whether /v1/completions can serve a template: its `prompt` fills the one field {input}."""
    return parse_template(template).fields == ("input",)


RoutedTask = Annotated[
    str | None, Header(alias="X-Ptserve-Task", description="the task the router hashed on; must equal `model`")
]


@router.post("/completions", responses={400: {"description": "X-Ptserve-Task differs from model"}})
async def completions(body: CompletionRequest, request: Request, inference: InferenceDep,
                      routed_task: RoutedTask = None):  # fmt: skip
    if routed_task is not None and routed_task != body.model:
        raise BadRequest(f"header X-Ptserve-Task is {routed_task!r} but model is {body.model!r}; they must be equal")
    records = await inference.generate(body.model, {"input": body.text()}, body.sampling_overrides(), body.stream)
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, finish_reason: str | None = None, usage: dict | None = None) -> dict:
        out = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
               "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}  # fmt: skip
        if usage is not None:
            out["usage"] = usage
        return out

    def usage(result) -> dict:
        n_in, n_out = result.prompt_tokens, len(result.token_ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    if body.stream:

        def final(rest: str, result) -> list:
            return [chunk(rest, result.finish_reason, usage(result)), "[DONE]"]

        def error(detail: str) -> dict:  # OpenAI's shape: its clients raise with this message
            return {"error": {"message": detail, "type": "server_error", "param": None, "code": None}}

        return StreamingResponse(sse_events(records, chunk, final, error), media_type="text/event-stream")
    result = await result_of(request, records)
    return chunk(result.text, result.finish_reason, usage(result))
