"""OpenAI's files and fine-tuning jobs API (server/fine_tuning/): the `openai`
client's `files.create`, `fine_tuning.jobs.create` and friends work unchanged;
ptserve's own fields (task_type, labels, template, from_prompt, encoder,
promote) go in the job body beside OpenAI's (the client's `extra_body`)."""

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import FilesDep, JobsDep
from server.api.errors import BadRequest

router = APIRouter(prefix="/v1", tags=["fine-tuning"])  # the write token: server/api/access.py

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/files")
async def upload_file(file: UploadFile, files: FilesDep, purpose: Annotated[str, Form()]):
    """Multipart fields `file` (JSONL: one example per line) and `purpose` ("fine-tune")."""
    data = await file.read(files.max_bytes + 1)
    return await run_in_threadpool(files.upload, file.filename or "", purpose, data)


@router.get("/files")
async def list_files(files: FilesDep):
    return {"object": "list", "data": await run_in_threadpool(files.list), "has_more": False}


@router.get("/files/{file_id}")
async def get_file(file_id: str, files: FilesDep):
    return await run_in_threadpool(files.get, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, files: FilesDep):
    return Response(await run_in_threadpool(files.content, file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, files: FilesDep):
    return await run_in_threadpool(files.delete, file_id)


_STR = {"type": "string"}
JOB_BODY = {  # checked by server/fine_tuning/jobs.py, which names the field at fault; published for clients
    "type": "object",
    "required": ["model", "training_file", "suffix"],
    "properties": {
        "model": {**_STR, "description": "the served base model (GET /v1/models)"},
        "training_file": {**_STR, "description": "a file id from POST /v1/files"},
        "validation_file": {**_STR, "description": "default: a quarter of the training file, held out"},
        "suffix": {**_STR, "description": "the task id to create, or to give a new version"},
        "hyperparameters": {"type": "object", "properties": {
            "n_epochs": {"type": ["integer", "string"]}, "batch_size": {"type": ["integer", "string"]},
            "learning_rate_multiplier": {"type": ["number", "string"]}}},
        "seed": {"type": "integer"},
        "task_type": {"enum": ["classify", "generate"]},
        "labels": {"type": "object", "additionalProperties": _STR, "description": "classify: label -> verbalizer"},
        "template": _STR, "from_prompt": _STR, "encoder": {"enum": ["lstm", "mlp", "none"]},
        "promote": {"enum": ["if_better", "always"]},
    },
}  # fmt: skip


@router.post("/fine_tuning/jobs", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": JOB_BODY}}}})  # fmt: skip
async def create_job(request: Request, jobs: JobsDep):
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return await run_in_threadpool(jobs.create, body)


@router.get("/fine_tuning/jobs")
async def list_jobs(jobs: JobsDep, after: str | None = None, limit: Limit = 20):
    return await run_in_threadpool(jobs.list, after, limit)


@router.get("/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, jobs: JobsDep):
    return await run_in_threadpool(jobs.get, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, jobs: JobsDep):
    return await run_in_threadpool(jobs.cancel, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, jobs: JobsDep, after: str | None = None, limit: Limit = 20):
    return await run_in_threadpool(jobs.events, job_id, after, limit)
