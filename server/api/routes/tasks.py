"""Managing tasks: upload, list, read, delete prompts."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ptcore.errors import PayloadTooLarge
from server.api.deps import TasksDep
from server.api.schemas import TaskSummary

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])  # which routes need a token: server/api/access.py


@router.put(
    "/{task_id}",
    status_code=201,
    response_model=TaskSummary,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_task(task_id: str, request: Request, tasks: TasksDep):
    """Upload a prompt artifact (safetensors bytes); makes a new version."""
    data = await request.body()  # its size was checked by the request gate (server/api/request_gate.py)
    return await run_in_threadpool(tasks.upload, task_id, data)


async def _read_file(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{upload.filename or 'file'} exceeds the limit of {limit} bytes")
    return data


@router.put("/{task_id}/peft", status_code=201, response_model=TaskSummary)
async def upload_peft(task_id: str, adapter_config: UploadFile, adapter_model: UploadFile, tasks: TasksDep):
    """Upload a PEFT PROMPT_TUNING / P_TUNING adapter as it was saved: multipart fields
    `adapter_config` (adapter_config.json) and `adapter_model` (adapter_model.safetensors)."""
    limit = tasks.settings.max_artifact_bytes
    config = await _read_file(adapter_config, limit)
    weights = await _read_file(adapter_model, limit)
    return await run_in_threadpool(tasks.upload_peft, task_id, config, weights)


@router.get("", response_model=list[TaskSummary])
async def list_tasks(tasks: TasksDep):
    return await run_in_threadpool(tasks.list)


@router.get("/{task_id}", response_model=TaskSummary)
async def get_task(task_id: str, tasks: TasksDep):
    return await run_in_threadpool(tasks.summary, task_id)


@router.get("/{task_id}/versions", response_model=list[TaskSummary])
async def list_versions(task_id: str, tasks: TasksDep):
    """Every version the store keeps (PTSERVE_KEEP_VERSIONS), newest first; a
    generate or classify request may name one (`"version": N`)."""
    return await run_in_threadpool(tasks.versions, task_id)


@router.get("/{task_id}/artifact", response_class=Response)
async def download_artifact(task_id: str, tasks: TasksDep, version: Annotated[int | None, Query(ge=1)] = None):
    """The latest version's artifact file (or a kept `version`'s), as uploaded
    (needs the write token: the trained prompt is its owner's asset). Uploading
    an older version's file again makes it the latest: a rollback."""
    stored = await run_in_threadpool(tasks.artifact, task_id, version)
    return Response(
        stored.data, media_type="application/octet-stream", headers={"X-Ptserve-Version": str(stored.version)}
    )


@router.delete("/{task_id}", status_code=204)
async def delete_task(task_id: str, tasks: TasksDep):
    await run_in_threadpool(tasks.delete, task_id)
    return Response(status_code=204)
