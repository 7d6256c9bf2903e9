"""Training files: OpenAI's /v1/files for purpose "fine-tune", checked line by
line at upload and kept in the fine-tuning store (prompt_store/fine_tuning_store.py)."""

from __future__ import annotations

import json
import re
import time
import uuid

from prompt_store.fine_tuning_store import FineTuningStore, held
from ptcore.errors import InvalidRequest, NotFound

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
EXAMPLE_KEYS = ({"label", "output", "completion"}, {"input", "inputs", "prompt"})


def check_file_id(file_id: str) -> str:
    if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
        raise NotFound(f"no file {file_id!r}")
    return file_id


class Files:
    def __init__(self, store: FineTuningStore, max_bytes: int, max_lines: int, max_files: int):
        self.store = store
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.max_files = max_files

    def upload(self, filename: str, purpose: str, data: bytes) -> dict:
        """Check every line (a JSON object with an input and a label or output,
        in ptserve's names or OpenAI's), then store. -> the file object. When
        max_files are kept, the oldest goes, unless a job that has not ended
        reads it (then the next oldest)."""
        if purpose != "fine-tune":
            raise InvalidRequest(f"purpose must be 'fine-tune', got {purpose!r}", "purpose")
        if len(data) > self.max_bytes:
            raise InvalidRequest(f"the file is {len(data)} bytes; the limit is {self.max_bytes}", "file")
        lines = check_lines(data, self.max_lines)
        record = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data),
                  "created_at": int(time.time()), "filename": filename or "upload.jsonl", "purpose": purpose,
                  "status": "processed", "lines": lines}  # fmt: skip
        kept = self.store.files()  # newest first
        in_use = self.in_use()
        expired = [f for f in reversed(kept) if f["id"] not in in_use][: max(0, len(kept) - (self.max_files - 1))]
        for old in expired:  # the oldest, but never a file a queued or running job will read
            self.store.delete_file(old["id"])
        self.store.put_file(record, data)
        return record

    def in_use(self) -> dict[str, str]:
        """file id -> the queued or running job that reads it."""
        return {job[key]: job["id"] for job in self.store.jobs() if held(self.store, job)
                for key in ("training_file", "validation_file") if job.get(key)}  # fmt: skip

    def get(self, file_id: str) -> dict:
        record = self.store.file(check_file_id(file_id))
        if record is None:
            raise NotFound(f"no file {file_id!r}")
        return record

    def content(self, file_id: str) -> bytes:
        data = self.store.file_content(check_file_id(file_id))
        if data is None:
            raise NotFound(f"no file {file_id!r}")
        return data

    def list(self) -> list[dict]:
        return self.store.files()

    def delete(self, file_id: str) -> dict:
        job = self.in_use().get(check_file_id(file_id))
        if job is not None:
            raise InvalidRequest(f"file {file_id} is read by fine-tuning job {job}, which has not ended: cancel the "
                                 "job or wait for its end first", "file_id")  # fmt: skip
        if not self.store.delete_file(file_id):
            raise NotFound(f"no file {file_id!r}")
        return {"id": file_id, "object": "file", "deleted": True}


def check_lines(data: bytes, max_lines: int) -> int:
    """-> the number of examples; a line that is not an example raises naming it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the file is not UTF-8 text (byte {e.start})", "file") from None
    count = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        count += 1
        if count > max_lines:
            raise InvalidRequest(f"more than {max_lines} examples; the limit is {max_lines}", "file")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"line {n}: not valid JSON ({e.msg})", "file") from None
        if not isinstance(obj, dict):
            raise InvalidRequest(f"line {n}: expected a JSON object, got {type(obj).__name__}", "file")
        targets, inputs = EXAMPLE_KEYS
        if not (targets & obj.keys()) or not (inputs & obj.keys()) and len(obj) < 2:
            raise InvalidRequest(f"line {n}: an example needs an input (input, a template field or prompt) "
                                 "and a label, output or completion", "file")  # fmt: skip
    if count == 0:
        raise InvalidRequest("the file holds no examples", "file")
    return count
