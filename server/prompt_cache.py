"""The server's LRU of TaskPrompts, kept fresh against the prompt store."""

from __future__ import annotations

import logging

from prompt_store.check import load_stored
from prompt_store.errors import StoreUnavailable
from prompt_store.store import PromptStore, StoredPrompt
from ptcore.errors import TaskNotFound
from ptcore.model import LoadedModel
from ptcore.task_prompt import TaskPrompt, task_prompt
from server.lru import LRU

log = logging.getLogger(__name__)


def not_found(store: PromptStore, task_id: str, version: int | None) -> TaskNotFound:
    """The 404 for a task the store lacks, or a version it does not keep (naming those it does)."""
    versions = [] if version is None else store.kept_versions(task_id)  # reads no artifact (one may be damaged)
    if not versions:
        return TaskNotFound(f"no prompt is stored for task {task_id!r}")
    kept = ", ".join(map(str, versions))
    return TaskNotFound(f"task {task_id!r} has no version {version}: the store keeps versions {kept} (newest first)")


def _key(task_id: str, version: int | None) -> str | tuple[str, int]:
    """A cache entry's key: the task id for its latest version, (task id, version) for a named one."""
    return task_id if version is None else (task_id, version)


class PromptCache:
    """Bounded LRU of TaskPrompts. Every lookup asks the store for the latest
    identity, (version, digest), and reloads when it changed. The disk store
    answers from a directory listing; the Redis store from memory while its
    invalidation channel is healthy, else with one HMGET
    (prompt_store/redis_invalidation.py says exactly when).

    A request may name an older version the store keeps: that prompt is an entry
    of its own, keyed (task id, version), checked against that version's identity
    (one directory listing, or one Redis call, per lookup)."""

    def __init__(self, store: PromptStore, loaded: LoadedModel, capacity: int, max_artifact_bytes: int):
        self.store = store
        self.loaded = loaded
        self.capacity = capacity
        self.max_artifact_bytes = max_artifact_bytes
        self._entries: LRU[str | tuple[str, int], TaskPrompt] = LRU(capacity)

    def get(self, task_id: str, version: int | None = None) -> TaskPrompt:
        """The latest version's prompt, or that of `version` (a kept one)."""
        key = _key(task_id, version)
        try:  # the store checks the task id first
            identity = self.store.identity(task_id, version)
        except StoreUnavailable:
            cached = self._entries.peek(key)
            if cached is None:
                raise
            log.warning("store unreachable; serving cached %s v%d", task_id, cached.version)
            return cached
        if identity is None:
            if version is None:
                self.drop(task_id)  # the task is gone: every version
            else:
                self._entries.pop(key)
            raise not_found(self.store, task_id, version)
        cached = self._entries.get(key, lambda prompt: prompt.identity == identity)
        return cached if cached is not None else self._load(task_id, version)

    def _load(self, task_id: str, version: int | None) -> TaskPrompt:
        stored = self.store.get(task_id, version)
        if stored is None:
            raise not_found(self.store, task_id, version)
        prompt = self._prompt(stored)
        # what the store held just now; a concurrent load of an older one that
        # lands later is noticed by the next lookup's identity check
        for evicted in self._entries.put(_key(task_id, version), prompt):
            log.info("prompt cache full: evicted %s", evicted)
        return prompt

    def _prompt(self, stored: StoredPrompt) -> TaskPrompt:
        artifact = load_stored(stored, self.max_artifact_bytes)  # a damaged one: 503
        return task_prompt(stored.task_id, stored.version, artifact, self.loaded, stored.digest)

    def drop(self, task_id: str) -> None:
        """Forget every version of a deleted task."""
        self._entries.pop_where(lambda key: key == task_id or (isinstance(key, tuple) and key[0] == task_id))

    def stats(self) -> dict:
        return self._entries.stats()
