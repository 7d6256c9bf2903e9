"""The one LRU map of the server (the prompt cache and the prefix cache use it).

Not cachetools.LRUCache: both callers need what it lacks, a lock (the prompt
cache is read from worker threads), hit, miss and eviction counters for
/v1/stats, and a hit that counts only when the cached value is still valid.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `capacity` entries (0: none are kept); the least recently used goes first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: K, valid: Callable[[V], bool] = lambda value: True) -> V | None:
        """The entry, counted as a hit and made the most recent, if there is one
        and `valid(entry)`; else None, counted as a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None or not valid(value):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: K) -> V | None:
        """The entry, if any, without counting or reordering."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> list[K]:
        """Keep `value` as the most recent entry; -> the keys evicted to make room."""
        evicted: list[K] = []
        if self.capacity < 1:
            return evicted
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                evicted.append(self._entries.popitem(last=False)[0])
                self.evictions += 1
        return evicted

    def pop(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def pop_where(self, chosen: Callable[[K], bool]) -> None:
        """Remove every entry whose key is `chosen`."""
        with self._lock:
            for key in [key for key in self._entries if chosen(key)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"size": len(self._entries), "capacity": self.capacity, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}  # fmt: skip
