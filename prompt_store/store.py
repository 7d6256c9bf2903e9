"""The prompt store interface, shared by the disk and Redis backends.

A store keeps artifact bytes per task id. Every `put` makes a new version;
versions of a task only grow, even across a delete, so a cached (task, version)
pair can never name two different prompts.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .errors import InvalidTaskId

_TASK_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def is_task_id(task_id) -> bool:
    return isinstance(task_id, str) and bool(_TASK_ID.fullmatch(task_id)) and task_id not in (".", "..")


def check_task_id(task_id: str) -> str:
    if not is_task_id(task_id):
        shown = task_id if not isinstance(task_id, str) or len(task_id) <= 40 else task_id[:40] + "..."
        raise InvalidTaskId(
            f"invalid task id {shown!r}: use 1-128 characters of A-Z a-z 0-9 . _ - (and not '.' or '..')"
        )
    return task_id


@dataclass(frozen=True)
class StoredPrompt:
    task_id: str
    version: int
    data: bytes  # the artifact file, as uploaded


class PromptStore(ABC):
    @abstractmethod
    def put(self, task_id: str, data: bytes) -> dict:
        """Store a new version; return the task summary (with its new version)."""

    @abstractmethod
    def get(self, task_id: str) -> StoredPrompt | None:
        """The latest version, or None."""

    @abstractmethod
    def version(self, task_id: str) -> int | None:
        """The latest version number (cheap), or None when the task does not exist."""

    @abstractmethod
    def summary(self, task_id: str) -> dict | None:
        """The latest version's summary (see artifact.summarize), or None."""

    @abstractmethod
    def list(self) -> list[dict]:
        """Summaries of all tasks, sorted by task id."""

    @abstractmethod
    def delete(self, task_id: str) -> bool:
        """Remove a task; False when it did not exist."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    def close(self) -> None:
        pass


def open_store(url: str) -> PromptStore:
    """`redis://...` / `rediss://...` -> Redis; anything else is a directory path."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(url)
    from .disk_store import DiskStore

    return DiskStore(url)
