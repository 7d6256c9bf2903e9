"""Keys and values of each task's static prefix (pseudo tokens and fixed text
before the template's first field), computed once per task version.

Entries are keyed by (task_id, version): versions only grow, so a new upload
can never be served an old prefix, and an evicted entry is simply recomputed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, length, head_dim]


class PrefixCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: tuple[str, int]) -> PrefixKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key: tuple[str, int], kv: PrefixKV) -> None:
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
