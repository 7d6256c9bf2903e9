"""The server's LRU of TaskPrompts, kept fresh against the prompt store."""

from __future__ import annotations

import logging

from prompt_store.artifact import read_artifact
from prompt_store.errors import StoreUnavailable
from prompt_store.store import PromptStore, StoredPrompt
from ptcore.errors import TaskNotFound
from ptcore.model import LoadedModel
from ptcore.task_prompt import TaskPrompt, task_prompt
from server.lru import LRU

log = logging.getLogger(__name__)


class PromptCache:
    """Bounded LRU of TaskPrompts. Every lookup asks the store for the latest
    identity, (version, digest), and reloads when it changed. The disk store
    answers from a directory listing; the Redis store from memory while its
    invalidation channel is healthy, else with one HMGET
    (prompt_store/redis_invalidation.py says exactly when)."""

    def __init__(self, store: PromptStore, loaded: LoadedModel, capacity: int, max_artifact_bytes: int):
        self.store = store
        self.loaded = loaded
        self.capacity = capacity
        self.max_artifact_bytes = max_artifact_bytes
        self._entries: LRU[str, TaskPrompt] = LRU(capacity)

    def get(self, task_id: str) -> TaskPrompt:
        try:  # the store checks the task id first
            identity = self.store.identity(task_id)
        except StoreUnavailable:
            cached = self._entries.peek(task_id)
            if cached is None:
                raise
            log.warning("store unreachable; serving cached %s v%d", task_id, cached.version)
            return cached
        if identity is None:
            self.drop(task_id)
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        cached = self._entries.get(task_id, lambda prompt: prompt.identity == identity)
        return cached if cached is not None else self._load(task_id)

    def _load(self, task_id: str) -> TaskPrompt:
        stored = self.store.get(task_id)
        if stored is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        prompt = self._prompt(stored)
        # what the store held just now; a concurrent load of an older one that
        # lands later is noticed by the next lookup's identity check
        for evicted in self._entries.put(task_id, prompt):
            log.info("prompt cache full: evicted %s", evicted)
        return prompt

    def _prompt(self, stored: StoredPrompt) -> TaskPrompt:
        artifact = read_artifact(stored.data, self.max_artifact_bytes)
        return task_prompt(stored.task_id, stored.version, artifact, self.loaded, stored.digest)

    def drop(self, task_id: str) -> None:
        self._entries.pop(task_id)

    def stats(self) -> dict:
        return self._entries.stats()
