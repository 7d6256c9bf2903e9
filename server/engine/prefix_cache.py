"""Keys and values of each task's static prefix (pseudo tokens and fixed text
before the template's first field), computed once per task version.

Entries are keyed by TaskPrompt.key, (task_id, version, digest of the artifact
bytes): a new upload is never served an old prefix, even when a store that lost
its data gives version 1 again; an evicted entry is simply recomputed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from server.engine.kv_cache import SlotKV

PromptKey = tuple[str, int, str]  # TaskPrompt.key: task_id, version, digest


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[PromptKey, SlotKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: PromptKey) -> SlotKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key: PromptKey, kv: SlotKV) -> None:
        if self.capacity < 1:
            return
        with self._lock:
            self._entries[key] = kv
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"size": len(self._entries), "capacity": self.capacity, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}  # fmt: skip
