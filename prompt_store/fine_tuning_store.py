"""Where fine-tuning files and jobs live: beside the prompts, in the same store
(a directory, or Redis), so that every replica lists the same files and jobs.

Records are JSON objects (OpenAI's file and job objects, as the API shows
them); a file also has its bytes, a job its events. The disk layout, under
the store's directory, in a folder no task id can name (`+` is not allowed in
one):

    +fine_tuning/files/<file_id>.json   the file object
    +fine_tuning/files/<file_id>.data   its bytes
    +fine_tuning/jobs/<job_id>.json     the job object
    +fine_tuning/jobs/<job_id>.events   its events, one JSON line each
    +fine_tuning/jobs/<job_id>.lease    until when its replica holds it (Unix time)

Each record is written to a temporary file and renamed, so a reader sees the
old record or the new one, never half of one; an event is one append. A job's
lease is a record of its own: renewing it never rewrites the job object, so a
renewal cannot undo a status written meanwhile.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

FOLDER = "+fine_tuning"
ACTIVE = ("validating_files", "queued", "running")  # a job's statuses before its end


class FineTuningStore(ABC):
    @abstractmethod
    def put_file(self, record: dict, data: bytes) -> None:
        """Store a file object (by its "id") and its bytes."""

    @abstractmethod
    def file(self, file_id: str) -> dict | None: ...

    @abstractmethod
    def file_content(self, file_id: str) -> bytes | None: ...

    @abstractmethod
    def files(self) -> list[dict]:
        """Every file object, newest first."""

    @abstractmethod
    def delete_file(self, file_id: str) -> bool: ...

    @abstractmethod
    def put_job(self, record: dict) -> None:
        """Create or replace a job object (by its "id")."""

    @abstractmethod
    def job(self, job_id: str) -> dict | None: ...

    @abstractmethod
    def jobs(self) -> list[dict]:
        """Every job object, newest first."""

    @abstractmethod
    def put_lease(self, job_id: str, until: float) -> None:
        """The replica that holds the job holds it until `until` (time.time())."""

    @abstractmethod
    def lease(self, job_id: str) -> float | None:
        """Until when the job is held; None: no lease was written."""

    @abstractmethod
    def add_event(self, job_id: str, event: dict) -> None: ...

    @abstractmethod
    def events(self, job_id: str) -> list[dict]:
        """The job's events, oldest first."""


def held(store: FineTuningStore, job: dict) -> bool:
    """Whether a job is active and the replica that took it still holds it (its
    lease has not run out); an active job that is not held: its server stopped."""
    if job["status"] not in ACTIVE:  # an ended job: no lease to read
        return False
    lease = store.lease(job["id"])
    if lease is None:  # a job written before leases were records of their own kept its lease in the job
        lease = job.get("ptserve", {}).get("lease_until", 0)
    return lease >= time.time()


def newest_first(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)


class DiskFineTuningStore(FineTuningStore):
    def __init__(self, root: str | Path):
        self.files_dir = Path(root) / FOLDER / "files"  # made by the first write: a store without
        self.jobs_dir = Path(root) / FOLDER / "jobs"  # fine-tuning holds only its prompts

    def put_file(self, record: dict, data: bytes) -> None:
        _write(self.files_dir / f"{record['id']}.data", data)
        _write(self.files_dir / f"{record['id']}.json", json.dumps(record).encode())  # last: the file exists now

    def file(self, file_id: str) -> dict | None:
        return _read_json(self.files_dir / f"{file_id}.json")

    def file_content(self, file_id: str) -> bytes | None:
        try:
            return (self.files_dir / f"{file_id}.data").read_bytes() if self.file(file_id) else None
        except FileNotFoundError:
            return None

    def files(self) -> list[dict]:
        return newest_first([r for p in self.files_dir.glob("*.json") if (r := _read_json(p)) is not None])

    def delete_file(self, file_id: str) -> bool:
        try:
            (self.files_dir / f"{file_id}.json").unlink()  # first: from here on the file does not exist
        except FileNotFoundError:
            return False
        (self.files_dir / f"{file_id}.data").unlink(missing_ok=True)
        return True

    def put_job(self, record: dict) -> None:
        _write(self.jobs_dir / f"{record['id']}.json", json.dumps(record).encode())

    def job(self, job_id: str) -> dict | None:
        return _read_json(self.jobs_dir / f"{job_id}.json")

    def jobs(self) -> list[dict]:
        return newest_first([r for p in self.jobs_dir.glob("*.json") if (r := _read_json(p)) is not None])

    def put_lease(self, job_id: str, until: float) -> None:
        _write(self.jobs_dir / f"{job_id}.lease", repr(float(until)).encode())

    def lease(self, job_id: str) -> float | None:
        try:
            return float((self.jobs_dir / f"{job_id}.lease").read_text())
        except FileNotFoundError:
            return None

    def add_event(self, job_id: str, event: dict) -> None:
        line = (json.dumps(event) + "\n").encode()
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.jobs_dir / f"{job_id}.events", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write of one line: appends from several processes do not interleave
        finally:
            os.close(fd)

    def events(self, job_id: str) -> list[dict]:
        try:
            lines = (self.jobs_dir / f"{job_id}.events").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
