"""The prompt store interface, shared by the disk and Redis backends.

A store keeps artifact bytes per task id. Every `put` of new bytes makes a new
version; versions of a task only grow, even across a delete. A store keeps the
latest `keep_versions` versions of each task (the latest included; older ones
are removed by the put that pushes them out), so a request may name an older
one, and a page may compare two. A delete removes every version. A store that lost
its data (an emptied Redis, a re-created task folder) restarts at version 1, so
a stored prompt is identified by (version, digest of its bytes): every cache
keys on that pair, never on the version alone.

Writes are all or nothing: a put or delete that raises changed nothing, except
StoreOutcomeUnknown (the store stopped answering after the write was sent), where
it may have happened; putting the same bytes again is then safe, since a put of
the bytes the task already holds makes no new version.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .errors import InvalidTaskId

DEFAULT_KEEP_VERSIONS = 5  # the latest and four before it: a few KB to a few MB per task
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


def check_keep_versions(keep: int) -> int:
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_versions must be an integer >= 1 (1: only the latest), got {keep!r}")
    return keep


def digest_of(data: bytes) -> str:
    """sha256 of an artifact's bytes, hex."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PromptIdentity:
    """Which prompt a task holds: equal identities mean equal bytes."""

    version: int
    digest: str  # digest_of(the artifact bytes)


@dataclass(frozen=True)
class StoredPrompt:
    task_id: str
    version: int
    data: bytes  # the artifact file, as uploaded
    digest: str  # digest_of(data)

    @property
    def identity(self) -> PromptIdentity:
        return PromptIdentity(self.version, self.digest)


class PromptStore(ABC):
    keep_versions: int = DEFAULT_KEEP_VERSIONS  # versions kept per task, the latest included

    @abstractmethod
    def put(self, task_id: str, data: bytes) -> dict:
        """Store a new version; return the task summary (with its new version).
        When `data` is exactly the latest version's bytes (compared byte for
        byte: a damaged copy whose digest matches does not count), store
        nothing and return that version's summary. Versions past
        `keep_versions` go."""

    @abstractmethod
    def get(self, task_id: str, version: int | None = None) -> StoredPrompt | None:
        """The latest version (or the kept `version`), or None."""

    @abstractmethod
    def identity(self, task_id: str, version: int | None = None) -> PromptIdentity | None:
        """The latest version's identity (or the kept `version`'s; cheap: no
        artifact bytes), or None when there is no such task or version."""

    def version(self, task_id: str) -> int | None:
        """The latest version number, or None when the task does not exist."""
        identity = self.identity(task_id)
        return None if identity is None else identity.version

    @abstractmethod
    def summary(self, task_id: str) -> dict | None:
        """The latest version's summary (see artifact.summarize), with `versions`:
        the numbers of the kept versions, newest first; or None."""

    @abstractmethod
    def versions(self, task_id: str) -> list[dict] | None:
        """The summary of every kept version, newest first; None when the task does not exist."""

    @abstractmethod
    def task_ids(self) -> list[str]:
        """Every task id, sorted, without reading any artifact (as `store check` needs)."""

    @abstractmethod
    def kept_versions(self, task_id: str) -> list[int]:
        """The numbers of the task's kept versions, newest first ([] when none)."""

    @abstractmethod
    def drop_version(self, task_id: str, version: int) -> bool:
        """Remove one kept version (a damaged one); False when it was not kept.
        When it was the latest, the newest kept one before it becomes the latest;
        when it was the only one, the task is gone. Version numbers still never repeat."""

    @abstractmethod
    def list(self) -> list[dict]:
        """Summaries of all tasks (as `summary`), sorted by task id."""

    @abstractmethod
    def delete(self, task_id: str) -> bool:
        """Remove a task, every version; False when it did not exist."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    def close(self) -> None:
        pass
