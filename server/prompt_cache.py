"""The server's LRU of TaskPrompts, kept fresh against the prompt store."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from prompt_store.artifact import read_artifact
from prompt_store.errors import StoreUnavailable, TaskNotFound
from prompt_store.store import PromptStore, StoredPrompt, check_task_id
from ptcore.model import LoadedModel
from ptcore.task_prompt import TaskPrompt, task_prompt

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
        self._entries: OrderedDict[str, TaskPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, task_id: str) -> TaskPrompt:
        check_task_id(task_id)
        try:
            identity = self.store.identity(task_id)
        except StoreUnavailable:
            with self._lock:
                cached = self._entries.get(task_id)
            if cached is None:
                raise
            log.warning("store unreachable; serving cached %s v%d", task_id, cached.version)
            return cached
        if identity is None:
            self.drop(task_id)
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        with self._lock:
            cached = self._entries.get(task_id)
            if cached is not None and cached.identity == identity:
                self._entries.move_to_end(task_id)
                self.hits += 1
                return cached
            self.misses += 1
        return self._load(task_id)

    def _load(self, task_id: str) -> TaskPrompt:
        stored = self.store.get(task_id)
        if stored is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        prompt = self._prompt(stored)
        with self._lock:
            # what the store held just now; a concurrent load of an older one that
            # lands later is noticed by the next lookup's identity check
            self._entries[task_id] = prompt
            self._entries.move_to_end(task_id)
            while len(self._entries) > self.capacity:
                evicted, _ = self._entries.popitem(last=False)
                self.evictions += 1
                log.info("prompt cache full: evicted %s", evicted)
        return prompt

    def _prompt(self, stored: StoredPrompt) -> TaskPrompt:
        artifact = read_artifact(stored.data, self.max_artifact_bytes)
        return task_prompt(stored.task_id, stored.version, artifact, self.loaded, stored.digest)

    def drop(self, task_id: str) -> None:
        with self._lock:
            self._entries.pop(task_id, None)

    def stats(self) -> dict:
        with self._lock:
            return {
                "size": len(self._entries),
                "capacity": self.capacity,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
